"""What the synthetic belt is made of: classes, NIR reflectance spectra, RGB looks.

Spectra are built, not measured: a smooth baseline times Gaussian absorption
bands at the positions the NIR literature gives for each material. Band
positions used (nm), from the C–H, O–H overtone and combination tables of
Workman & Weyer, "Practical Guide to Interpretive Near-Infrared Spectroscopy"
(CRC, 2007), and the resin peak lists of Masoumi, Safavi & Khani,
"Identification and classification of plastic resins using near infrared
reflectance spectroscopy", Int. J. Mech. Ind. Eng. 6 (2012):

- CH2 (polyethylene): 2nd overtone 1210, combination 1395/1415; the 1st
  overtone at 1728/1764 lies just past 1700, so PE spectra fall off at the
  red end. LDPE's bands are broader and weaker than HDPE's (branching,
  lower crystallinity).
- CH3 (polypropylene): 2nd overtone 1195 beside the CH2 1215, combination
  1395, 1st overtone 1700 inside the range: PP's doublet near 1200 and its
  1700 edge tell it from PE.
- Aromatic C–H (polystyrene, PET): 2nd overtone 1140 (PS) / 1130 (PET),
  1st overtone 1680 (PS) / 1660 (PET), PET's ester shows weaker 1410.
- PVC: few C–H per unit, CH2 next to Cl: weak 1190, 1410, 1716.
- Cellulose (paper, cardboard): C–H 1200, broad O–H 1490 with bound water at
  1450, a rising baseline from lignin in brown board.
- Aluminium: a high, nearly flat metallic reflectance, no bands.
- Carbon-black pigment absorbs across the NIR: black plastics reflect 3–5 %
  with their polymer bands nearly gone, which is why NIR sorters need other
  sensors for them. They keep their polymer's class here: the model has to
  learn that it cannot always tell.

RGB looks are chosen so that several classes coincide in colour: clear PET,
PS and PP bottles are all light, transparent and bluish; white HDPE and white
PP are the same white; black anything is black.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES = ("belt", "PET", "PP", "HDPE", "LDPE", "PS", "PVC", "paper", "aluminium", "other")
CLASS_ID = {name: i for i, name in enumerate(CLASSES)}

# Display colours for label images (not what the camera sees).
PALETTE = np.array([
    (40, 40, 40), (31, 119, 180), (255, 127, 14), (44, 160, 44), (152, 223, 138),
    (214, 39, 40), (148, 103, 189), (140, 86, 75), (200, 200, 200), (227, 119, 194),
], dtype=np.uint8)

# Absorption bands per material: (centre nm, width nm (sigma), depth in optical density).
BANDS: dict[str, list[tuple[float, float, float]]] = {
    "belt": [(1200, 40, 0.05), (1420, 60, 0.06), (1690, 50, 0.05)],  # black rubber/PVC belt: faint
    "PET": [(1130, 20, 0.35), (1410, 30, 0.25), (1660, 18, 0.75), (1250, 40, 0.10)],
    "PP": [(1195, 15, 0.45), (1215, 15, 0.40), (1395, 22, 0.50), (1700, 20, 0.85)],
    "HDPE": [(1210, 16, 0.60), (1395, 14, 0.45), (1415, 14, 0.50), (1728, 30, 1.20)],
    "LDPE": [(1212, 24, 0.38), (1400, 24, 0.35), (1420, 22, 0.30), (1730, 40, 0.80)],
    "PS": [(1140, 16, 0.55), (1215, 25, 0.20), (1680, 14, 0.90), (1420, 40, 0.15)],
    "PVC": [(1190, 25, 0.18), (1410, 35, 0.20), (1716, 25, 0.35)],
    "paper": [(1200, 40, 0.12), (1450, 45, 0.25), (1490, 70, 0.35), (1590, 60, 0.08)],
    "aluminium": [],
    "other": [(1180, 60, 0.15), (1450, 80, 0.30), (1620, 60, 0.10)],  # wood, rubber, textiles: broad water/organic
    "dirt": [(1450, 90, 0.30)],
}

# Baseline reflectance at 900 nm and its slope per 100 nm.
BASELINE: dict[str, tuple[float, float]] = {
    "belt": (0.07, 0.0), "PET": (0.72, -0.01), "PP": (0.78, -0.01), "HDPE": (0.80, -0.01),
    "LDPE": (0.70, -0.01), "PS": (0.74, -0.01), "PVC": (0.62, 0.0), "paper": (0.62, 0.012),
    "aluminium": (0.80, 0.004), "other": (0.40, 0.02), "dirt": (0.18, 0.01),
}


def reflectance(material: str, wavelengths_nm: np.ndarray, strength: float = 1.0,
                base_scale: float = 1.0) -> np.ndarray:
    """Reflectance (0..1) of a material: baseline × exp(−Σ bands), bands scaled by strength."""
    r0, slope = BASELINE[material]
    base = (r0 + slope * (wavelengths_nm - 900.0) / 100.0) * base_scale
    od = np.zeros_like(wavelengths_nm, dtype=np.float64)
    for centre, sigma, depth in BANDS[material]:
        od += depth * strength * np.exp(-0.5 * ((wavelengths_nm - centre) / sigma) ** 2)
    return np.clip(base * np.exp(-od), 0.0, 1.0)


# Surface variants: how the same polymer can look. `nir` is (band strength,
# baseline scale): clear items let light through to the dark belt and back (a
# lower baseline, longer path, deeper bands); carbon black kills both.
@dataclass(frozen=True)
class Variant:
    name: str
    rgb: tuple[int, int, int]       # base colour (sRGB)
    alpha: float                    # opacity in RGB (1: opaque; clear items show the belt)
    nir: tuple[float, float]
    gloss: float                    # specular highlight strength in RGB


VARIANTS = {
    "clear": Variant("clear", (205, 220, 230), 0.30, (1.4, 0.45), 0.8),
    "white": Variant("white", (232, 232, 226), 1.0, (1.0, 1.0), 0.2),
    "coloured": Variant("coloured", (0, 0, 0), 1.0, (1.0, 0.9), 0.3),   # colour drawn per object
    "black": Variant("black", (22, 22, 24), 1.0, (0.08, 0.06), 0.25),
    "brown": Variant("brown", (160, 120, 80), 1.0, (1.0, 1.0), 0.0),
    "grey": Variant("grey", (150, 150, 150), 1.0, (1.0, 1.0), 0.0),
    "metal": Variant("metal", (190, 192, 196), 1.0, (1.0, 1.0), 1.0),
}

# The spectral endmembers a pixel can show: every (material, variant) an object
# may have, plus what sits on objects (paper labels, film labels, dirt) and the
# calibration target's white patches. An index into this table is what the
# scene stores per pixel; the HSI camera mixes their spectra.
ENDMEMBERS: list[tuple[str, str]] = [("belt", "grey")]
for _m in CLASSES[1:]:
    for _v in ("clear", "white", "coloured", "black", "brown", "grey", "metal"):
        ENDMEMBERS.append((_m, _v))
ENDMEMBERS += [("paper", "label"), ("PP", "label"), ("dirt", "dirt"), ("target", "white")]
ENDMEMBER = {key: i for i, key in enumerate(ENDMEMBERS)}
ENDMEMBER_LOOK = tuple(look for _, look in ENDMEMBERS)   # endmember index -> its look (clear, black, ...)


def endmember_spectra(wavelengths_nm: np.ndarray) -> np.ndarray:
    """(endmembers, bands) float32 reflectance table, row i for ENDMEMBER index i."""
    rows = []
    for material, variant in ENDMEMBERS:
        if material == "target":
            rows.append(np.full(wavelengths_nm.shape, 0.92))   # a near-Lambertian white panel
        elif variant in VARIANTS:
            strength, scale = VARIANTS[variant].nir if material != "belt" else (1.0, 1.0)
            rows.append(reflectance(material, wavelengths_nm, strength, scale))
        else:   # labels and dirt: as the base material
            rows.append(reflectance(material, wavelengths_nm))
    return np.asarray(rows, dtype=np.float32)


# Which variants each class's objects come in, with weights, and which shapes.
LOOKS: dict[str, list[tuple[str, float]]] = {
    "PET": [("clear", 0.6), ("coloured", 0.2), ("black", 0.1), ("white", 0.1)],
    "PP": [("white", 0.35), ("clear", 0.2), ("coloured", 0.25), ("black", 0.2)],
    "HDPE": [("white", 0.55), ("coloured", 0.35), ("black", 0.1)],
    "LDPE": [("clear", 0.6), ("white", 0.2), ("coloured", 0.2)],
    "PS": [("clear", 0.35), ("white", 0.35), ("black", 0.3)],
    "PVC": [("clear", 0.3), ("grey", 0.4), ("white", 0.2), ("black", 0.1)],
    "paper": [("brown", 0.6), ("white", 0.25), ("coloured", 0.15)],
    "aluminium": [("metal", 0.7), ("coloured", 0.3)],
    "other": [("brown", 0.4), ("grey", 0.3), ("coloured", 0.3)],
}

SHAPES: dict[str, list[tuple[str, float]]] = {
    "PET": [("bottle", 0.6), ("tray", 0.25), ("flake", 0.15)],
    "PP": [("tray", 0.35), ("bottle", 0.25), ("film", 0.2), ("flake", 0.2)],
    "HDPE": [("bottle", 0.7), ("flake", 0.3)],
    "LDPE": [("film", 0.85), ("flake", 0.15)],
    "PS": [("tray", 0.7), ("flake", 0.3)],
    "PVC": [("tray", 0.4), ("flake", 0.4), ("bottle", 0.2)],
    "paper": [("cardboard", 0.8), ("flake", 0.2)],
    "aluminium": [("can", 0.85), ("flake", 0.15)],
    "other": [("blob", 0.8), ("flake", 0.2)],
}

DEFAULT_MIX = {"PET": 0.22, "PP": 0.12, "HDPE": 0.14, "LDPE": 0.10, "PS": 0.07, "PVC": 0.04,
               "paper": 0.14, "aluminium": 0.08, "other": 0.09}
