"""GenICam line-scan acquisition (RGB and hyperspectral) through harvesters.

convert: pixel formats and axis orders to message arrays (no device needed);
position: belt positions and gaps; features: setting GenICam features;
device: producers, device lists, selection; camera: one open device;
acquisition: the fetch thread and its ring; node: the `acquire` node kind;
listing: `sortline cameras`.
"""
