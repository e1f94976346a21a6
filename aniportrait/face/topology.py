"""Named parts of MediaPipe's 478-point face topology and the official pose-image drawing spec.

Vertex indices are MediaPipe's (468 mesh vertices, then 10 iris points). The drawing groups and colours
are those of the official ``FaceMeshVisualizer(forehead_edge=False)``, listed in the order it draws them
(later lines overwrite earlier ones); ``tests/face/test_drawing.py`` checks them against the reference.
"""

from __future__ import annotations

NUM_MESH_VERTICES = 468
NUM_LANDMARKS = 478

# (name, BGR-as-stored colour, edges) in the official draw order.
DRAW_GROUPS: tuple[tuple[str, tuple[int, int, int], tuple[tuple[int, int], ...]], ...] = (
    ("face_oval", (10, 200, 10), (
        (176, 149), (150, 136), (356, 454), (58, 132), (152, 148), (361, 288), (251, 389), (132, 93),
        (389, 356), (400, 377), (136, 172), (377, 152), (323, 361), (172, 58), (454, 323), (365, 379),
        (379, 378), (148, 176), (93, 234), (397, 365), (149, 150), (288, 397), (234, 127), (378, 400),
        (127, 162), (162, 21))),
    ("left_eye", (180, 200, 10), (
        (374, 380), (390, 373), (249, 390), (385, 384), (373, 374), (263, 466), (387, 386), (381, 382),
        (384, 398), (466, 388), (386, 385), (388, 387), (263, 249), (380, 381), (398, 362), (382, 362))),
    ("left_eyebrow", (180, 220, 10), (
        (334, 296), (276, 283), (293, 334), (295, 285), (296, 336), (282, 295), (283, 282), (300, 293))),
    ("right_eye", (10, 200, 180), (
        (154, 155), (33, 7), (246, 161), (159, 158), (144, 145), (173, 133), (158, 157), (163, 144),
        (153, 154), (7, 163), (161, 160), (157, 173), (33, 246), (160, 159), (145, 153), (155, 133))),
    ("right_eyebrow", (10, 220, 180), (
        (46, 53), (66, 107), (52, 65), (53, 52), (63, 105), (70, 63), (65, 55), (105, 66))),
    ("lips_outer_bottom_left", (10, 180, 20), ((61, 146), (146, 91), (91, 181), (181, 84), (84, 17))),
    ("lips_outer_bottom_right", (20, 10, 180), ((17, 314), (314, 405), (405, 321), (321, 375), (375, 291))),
    ("lips_inner_bottom_left", (100, 100, 30), ((78, 95), (95, 88), (88, 178), (178, 87), (87, 14))),
    ("lips_inner_bottom_right", (100, 150, 50), ((14, 317), (317, 402), (402, 318), (318, 324), (324, 308))),
    ("lips_outer_top_left", (20, 80, 100), ((61, 185), (185, 40), (40, 39), (39, 37), (37, 0))),
    ("lips_outer_top_right", (80, 100, 20), ((0, 267), (267, 269), (269, 270), (270, 409), (409, 291))),
    ("lips_inner_top_left", (120, 100, 200), ((78, 191), (191, 80), (80, 81), (81, 82), (82, 13))),
    ("lips_inner_top_right", (150, 120, 100), ((13, 312), (312, 311), (311, 310), (310, 415), (415, 308))),
)


def _ring(*groups: str) -> tuple[int, ...]:
    """Vertices of the named draw groups, in first-seen order."""
    seen: dict[int, None] = {}
    for name, _, edges in DRAW_GROUPS:
        if name in groups:
            for a, b in edges:
                seen.setdefault(a)
                seen.setdefault(b)
    return tuple(seen)


LIPS_OUTER = _ring("lips_outer_bottom_left", "lips_outer_bottom_right", "lips_outer_top_left", "lips_outer_top_right")
LIPS_INNER = _ring("lips_inner_bottom_left", "lips_inner_bottom_right", "lips_inner_top_left", "lips_inner_top_right")
LIP_VERTICES = tuple(sorted(set(LIPS_OUTER) | set(LIPS_INNER)))  # 40 vertices: the LVE region
LEFT_EYE = _ring("left_eye")
RIGHT_EYE = _ring("right_eye")
FACE_OVAL = _ring("face_oval")

# Inner-lip contour in polygon order (corner 78 -> lower lip -> corner 308 -> upper lip).
INNER_LIP_POLYGON = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191)
# Eye openings in polygon order: (corner, lower lid ..., corner, upper lid ...).
RIGHT_EYE_POLYGON = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
LEFT_EYE_POLYGON = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
# Upper / lower eyelid vertices (without the corners), used for blinks.
RIGHT_UPPER_LID = (173, 157, 158, 159, 160, 161, 246)
RIGHT_LOWER_LID = (7, 163, 144, 145, 153, 154, 155)
LEFT_UPPER_LID = (398, 384, 385, 386, 387, 388, 466)
LEFT_LOWER_LID = (249, 390, 373, 374, 380, 381, 382)

UPPER_INNER_LIP_CENTRE = 13
LOWER_INNER_LIP_CENTRE = 14
MOUTH_CORNERS = (61, 291)
RIGHT_IRIS = (468, 469, 470, 471, 472)  # centre, then the ring
LEFT_IRIS = (473, 474, 475, 476, 477)

# MediaPipe's 52 blendshape names, index 0 is the neutral score.
BLENDSHAPE_NAMES = (
    "_neutral", "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight", "eyeBlinkLeft", "eyeBlinkRight", "eyeLookDownLeft",
    "eyeLookDownRight", "eyeLookInLeft", "eyeLookInRight", "eyeLookOutLeft", "eyeLookOutRight",
    "eyeLookUpLeft", "eyeLookUpRight", "eyeSquintLeft", "eyeSquintRight", "eyeWideLeft", "eyeWideRight",
    "jawForward", "jawLeft", "jawOpen", "jawRight", "mouthClose", "mouthDimpleLeft", "mouthDimpleRight",
    "mouthFrownLeft", "mouthFrownRight", "mouthFunnel", "mouthLeft", "mouthLowerDownLeft",
    "mouthLowerDownRight", "mouthPressLeft", "mouthPressRight", "mouthPucker", "mouthRight",
    "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper", "mouthSmileLeft",
    "mouthSmileRight", "mouthStretchLeft", "mouthStretchRight", "mouthUpperUpLeft", "mouthUpperUpRight",
    "noseSneerLeft", "noseSneerRight",
)
BLENDSHAPE_INDEX = {name: i for i, name in enumerate(BLENDSHAPE_NAMES)}
