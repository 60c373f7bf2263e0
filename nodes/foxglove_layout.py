"""The operator's Foxglove layout, made with Foxglove's own layout types (foxglove-sdk, the live extra).

Two tabs: the live view's channels (the belt with its objects and air, the
class mask, the machine's state, decision latency and belt speed) and a
recording's camera pictures. The topics are the ones the live view and the
recorder publish, taken from them, so the layout cannot drift from what they
send. The shipped file, docs/foxglove/sortline-layout.json, is this layout
(tests/test_live_view.py checks it); after a change here, write it again:

    python -m sortline.nodes.foxglove_layout docs/foxglove/sortline-layout.json
"""

from __future__ import annotations

import json
import sys

import foxglove.layouts as fl

from sortline.nodes.live_view import TOPICS
from sortline.nodes.record import image_topic


def _image(topic: str, title: str, annotated: bool = False) -> fl.ImagePanel:
    annotations = {TOPICS["annotations"]: fl.ImageAnnotationSettings(visible=True)} if annotated else None
    return fl.ImagePanel(title=title, config=fl.ImageConfig(
        image_mode=fl.ImageModeConfig(image_topic=topic, annotations=annotations)))


def layout() -> fl.Layout:
    state = TOPICS["state"]
    live = fl.SplitContainer(direction="row", items=[
        fl.SplitItem(proportion=2, content=_image(TOPICS["rgb"], "Belt (RGB), objects and air", annotated=True)),
        fl.SplitItem(proportion=2, content=_image(TOPICS["mask"], "Class mask", annotated=True)),
        fl.SplitItem(proportion=1.5, content=fl.SplitContainer(direction="column", items=[
            fl.SplitItem(proportion=2, content=fl.RawMessagesPanel(
                title="Machine state", config=fl.RawMessagesConfig(expansion="all", topic_path=state))),
            fl.SplitItem(proportion=1, content=fl.PlotPanel(
                title="Decision latency (ms) and belt speed (m/s)", config=fl.PlotConfig(paths=[
                    fl.PlotSeries(label="decision latency ms", value=f"{state}.decision_latency_ms"),
                    fl.PlotSeries(label="belt m/s", value=f"{state}.belt_speed_m_s")]))),
        ])),
    ])
    recording = fl.SplitContainer(direction="row", items=[
        fl.SplitItem(proportion=1, content=_image(image_topic("rgb"), "RGB camera (recording)")),
        fl.SplitItem(proportion=1, content=_image(image_topic("hsi"), "HSI camera, false colour (recording)")),
    ])
    return fl.Layout(content=fl.TabContainer(selected_tab_index=0, tabs=[
        fl.TabItem(title="Live view", content=live), fl.TabItem(title="Recording", content=recording)]))


def layout_json() -> str:
    """The layout as the file Foxglove imports (Layout -> Import from file)."""
    return json.dumps(json.loads(layout().to_json()), indent=2) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m sortline.nodes.foxglove_layout FILE.json")
    with open(sys.argv[1], "w") as fh:
        fh.write(layout_json())
