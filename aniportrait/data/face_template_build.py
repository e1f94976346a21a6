"""Rebuild the face template (``aniportrait/face/assets/face_template.npz``, described in ``aniportrait.face.template``)
from the sample media: ``python -m aniportrait.data.face_template_build build --samples ../shared/samples``.

It lives above ``face`` because it reads videos (``data.video``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from aniportrait.data.video import probe_video, read_video
from aniportrait.face.landmarks import FaceLandmarker
from aniportrait.face.metric import GeometryMetadata
from aniportrait.face.template import TEMPLATE_PATH, FaceTemplate, open_triangles
from aniportrait.face.topology import BLENDSHAPE_INDEX

__all__ = ["build_face_template"]


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
