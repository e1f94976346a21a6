"""The project's neutral face template: a 468-vertex metric mesh and its render triangles.

``assets/face_template.npz`` was made by ``python -m aniportrait.face.template build`` from the media in
``shared/samples`` (4 talking-head clips and 3 portraits): MediaPipe's FaceLandmarker gave landmarks and
transformation matrices, ``aniportrait.face.metric`` turned them into pose-free metric meshes, frames with
the mouth closed and eyes open (blendshapes jawOpen < 0.05, eyeBlink < 0.35) were kept, each source's
median mesh was taken, and the sources were averaged. The triangles are MediaPipe's canonical-mesh
triangles (from the landmarker bundle's geometry metadata) minus the ones that close the mouth and the
eyes, so those stay open when the face is rendered. About 10 KB; the synthetic dataset builds its
identities from it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from aniportrait.face.topology import BLENDSHAPE_INDEX, INNER_LIP_POLYGON, LEFT_EYE_POLYGON, RIGHT_EYE_POLYGON

__all__ = ["FaceTemplate", "load_face_template", "build_face_template"]

TEMPLATE_PATH = Path(__file__).parent / "assets" / "face_template.npz"


@dataclass(frozen=True)
class FaceTemplate:
    mesh: np.ndarray  # (468, 3) float32, centimetres, canonical pose-free space
    triangles: np.ndarray  # (F, 3) int64, counter-clockwise seen from the front


@lru_cache(maxsize=1)
def load_face_template(path: str | None = None) -> FaceTemplate:
    with np.load(Path(path) if path else TEMPLATE_PATH) as data:
        return FaceTemplate(mesh=data["mesh"].astype(np.float32), triangles=data["triangles"].astype(np.int64))


def open_triangles(triangles: np.ndarray) -> np.ndarray:
    """Drop triangles whose three vertices all lie on the inner-lip or an eye contour (hole fillers)."""
    keep = np.ones(len(triangles), dtype=bool)
    for ring in (INNER_LIP_POLYGON, LEFT_EYE_POLYGON, RIGHT_EYE_POLYGON):
        keep &= ~np.isin(triangles, ring).all(axis=1)
    return triangles[keep]


def _neutral_meshes(frames, detect) -> list[np.ndarray]:
    meshes = []
    for index, frame in enumerate(frames):
        face = detect(frame, index)
        if face is None:
            continue
        blend = face.blendshapes
        closed = blend[BLENDSHAPE_INDEX["jawOpen"]] < 0.05
        eyes_open = max(blend[BLENDSHAPE_INDEX["eyeBlinkLeft"]], blend[BLENDSHAPE_INDEX["eyeBlinkRight"]]) < 0.35
        if closed and eyes_open:
            meshes.append(face.mesh3d.astype(np.float64))
    return meshes


def build_face_template(samples_dir: str | Path, task_path: str | Path) -> tuple[FaceTemplate, list[str]]:
    """Recompute the template from the sample media (see the module docstring)."""
    import cv2

    from aniportrait.data.video import probe_video, read_video
    from aniportrait.face.landmarks import FaceLandmarker
    from aniportrait.face.metric import GeometryMetadata

    samples_dir = Path(samples_dir)
    per_source, used = [], []
    for video in sorted((samples_dir / "video").glob("*.mp4")):
        fps = probe_video(video).fps
        with FaceLandmarker(task_path, mode="video", max_faces=1) as landmarker:
            meshes = _neutral_meshes(read_video(video), lambda f, i, fps=fps: landmarker.detect(f, round(i * 1000 / fps)))
        if meshes:
            per_source.append(np.median(np.stack(meshes), axis=0))
            used.append(f"{video.name}: {len(meshes)} neutral frames")
    with FaceLandmarker(task_path, mode="image", max_faces=1) as landmarker:
        for image_path in sorted((samples_dir / "images").glob("*.png")):
            image = cv2.cvtColor(cv2.imread(str(image_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            meshes = _neutral_meshes([image], lambda f, i: landmarker.detect(f))
            if meshes:
                per_source.append(meshes[0])
                used.append(f"{image_path.name}: 1 neutral frame")
    if not per_source:
        raise RuntimeError(f"no neutral face found in {samples_dir}")
    mesh = np.mean(np.stack(per_source), axis=0).astype(np.float32)
    triangles = open_triangles(GeometryMetadata.from_task_file(task_path).triangles)
    return FaceTemplate(mesh=mesh, triangles=triangles), used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--samples", required=True, help="the shared/samples folder")
    parser.add_argument("--model", default=None, help="face_landmarker .task (default: <samples>/models/...)")
    parser.add_argument("--out", default=str(TEMPLATE_PATH))
    args = parser.parse_args()
    task = args.model or Path(args.samples) / "models" / "face_landmarker_v2_with_blendshapes.task"
    template, used = build_face_template(args.samples, task)
    np.savez_compressed(args.out, mesh=template.mesh, triangles=template.triangles.astype(np.uint16))
    print("\n".join(used))
    print(f"wrote {args.out}: mesh {template.mesh.shape}, {len(template.triangles)} triangles")


if __name__ == "__main__":
    main()
