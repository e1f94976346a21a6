"""The embedded synthetic talking-head dataset: rendered faces in MediaPipe's 478-point topology, speech-like
audio that drives their mouths, and exact ground truth, in the clip format (GUIDE section 3).

``ensure_synthetic_dataset(root, SyntheticSpec())`` generates it on first use under
``root/synthetic-<hash of the spec>`` (by default 6 identities x 8 clips of about 4 s at 30 fps) and
returns the folder; ``generate_clip(spec, identity, clip)`` makes one clip in memory. Everything is a
pure function of the spec's seed, the identity index and the clip index.

Identities (``identity.py``): face shape (the project's face template under an anisotropic scale, jaw
width, nose length and mirrored bumps), skin, lip, brow, hair, iris, clothing and background colours,
hair volume and length, base voice pitch (90-230 Hz), formant scale and speaking rate (3.6-5.4
syllables/s).

Audio (``speech.py``), 16 kHz mono: phrases of 2-5 words of 1-3 syllables, word gaps, 0.25-0.7 s phrase
pauses, and silence at both ends. A syllable is a vowel from {a, e, i, o, u} (a Rosenberg glottal pulse
train with per-phrase declining intonation and pitch accents, through the vowel's F1/F2/F3 resonators),
optionally preceded by a consonant (a 15-45 ms band-passed noise burst at its onset). Faint white noise
(-60 dBFS) lies under everything.

The audio -> mouth relation (exact; ``speech.mouth_controls`` and ``expression.express``):

    Syllable s (start a_s, duration d_s, vowel v_s, stress k_s in [0.6, 1]) has the envelope
        e_s(t) = k_s * min(A(u), D(u)),  u = (t - a_s) / d_s in [0, 1), and 0 outside,
        A(u) = 0.5 - 0.5 cos(pi * min(u / 0.3, 1))             (attack: first 30 % of the syllable)
        D(u) = 0.5 + 0.5 cos(pi * clip((u - 0.6) / 0.4, 0, 1))  (decay: last 40 %; flat in between).
    Syllables do not overlap; e(t) = sum_s e_s(t) is 0 in pauses.
    Audio: the vowel's waveform (glottal source x e_s through its formant resonators) is scaled so its
        energy over the syllable equals that of 0.18 * loudness(v_s) * e_s(t), with loudness =
        0.5 + 0.5 * openness (open vowels are louder); consonant bursts sit at syllable onsets, where
        e_s is still small.
    Per video frame t, over the audio samples of [t / fps, (t + 1) / fps) (no lag):
        envelope[t] = mean e(n)
        jaw_open[t] = mean e(n) * openness(v(n)),  openness: a 1.0, o 0.8, e 0.7, u 0.5, i 0.45
        spread[t]   = mean e(n) * spread(v(n)),    spread:   i 1.0, e 0.5, a 0.2, o 0, u 0
        pucker[t]   = mean e(n) * pucker(v(n)),    pucker:   u 1.0, o 0.7, a e i 0
    Mesh: the jaw (lower lip, chin, and the cheeks with smoothly decreasing weight) rotates by
        13 deg * jaw_open[t] about a horizontal axis through the jaw joints; the upper lip rises by up
        to 0.12 cm * jaw_open[t]; spread / pucker scale the mouth region horizontally by up to +30 % /
        -28 % about the mouth centre, pucker also narrowing it vertically by 14 % and pushing the lips
        0.6 cm forwards (the mouth region is a Gaussian around the mouth, so the corners move most).
    So the inner-lip gap mouth_open = |v13 - v14| is 0.03 cm (sealed lips) where e = 0 and grows
    monotonically with jaw_open (2.4-2.8 cm at jaw_open = 1, depending on the identity's face size).

Eyes: both blink together every 2-6 s (first blink at 0.3-3 s), each blink 120-200 ms (40 % closing,
60 % opening); at closure 1 both lid margins meet a quarter of the way up from the lower lid.

Head (``motion.py``): pose6 = bounded sums of slow sinusoids (pitch +-8 deg, yaw +-15, roll +-5,
translation +-1 / 0.8 / 1.5 cm) plus a nod of 2 deg * (envelope smoothed with a 0.12 s Gaussian) on the
pitch. ``trans_mat[t] = placement @ M(pose6_abs[t])``: the placement centres the face and scales it to
55-65 % of the frame's height (chin to forehead).

Ground truth in landmarks.npz (the clip format's arrays, float32 unless noted):

    lmks        (T, 478, 3) x, y: ``project_points(mesh3d, trans_mat)`` / size (iris points likewise);
                z: camera-space depth minus the mean depth of the 468 mesh vertices, divided by the
                frame's visible width at that mean depth (x's scale; negative is nearer the camera).
                Iris points 468-472 (right) and 473-477 (left): centre at the mean of the eye's contour
                in the neutral face, then the ring at +x, +y (up), -x, -y, radius 0.58 cm.
    mesh3d      (T, 468, 3) neutral_mesh + expression offsets, canonical pose-free space (cm)
    trans_mat   (T, 4, 4) canonical -> camera
    blendshapes (T, 52) jawOpen = jaw_open, mouthPucker = pucker, mouthFunnel = pucker * jaw_open,
                mouthStretchLeft = mouthStretchRight = spread, eyeBlinkLeft / Right = blink,
                all others 0, _neutral included (MediaPipe reports about 1e-6 for it on real faces)
    valid       (T,) bool, all True
    pose6       (T, 6) head pose relative to frame 0: trans_mat[t] = trans_mat[0] @ M(pose6[t])
    mouth_open  (T,) |v13 - v14| in mesh3d (cm)      jaw_open, envelope (T,)  the controls above
    blink       (T, 2) lid closure, columns (left, right)      neutral_mesh (468, 3)

T = ceil(audio duration x fps); the audio lasts between (T - 1) / fps and T / fps.
"""

from aniportrait.data.synthetic.dataset import (
    SyntheticClip,
    SyntheticSpec,
    dataset_dir,
    ensure_synthetic_dataset,
    generate_clip,
)

__all__ = ["SyntheticSpec", "SyntheticClip", "dataset_dir", "ensure_synthetic_dataset", "generate_clip"]
