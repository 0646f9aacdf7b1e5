"""IJB-B/C (`facecluster ijb`): the release's lists, the alignment by five points, the
template pooling, the TAR at FAR of arcface_torch's eval_ijbc.py (1:1) and the rank-k
and TPIR at FPIR of InsightFace's IJB_evals.py (1:N). The command itself runs on an
export in tests/test_deploy.py."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from facecluster.data.ijb import (
    REFERENCE,
    IJBFaces,
    align_face,
    read_ijb,
    similarity_transform,
)
from facecluster.data.images import decode_image
from facecluster.inference.ijb import (
    FPIRS,
    evaluate_ijb,
    pair_scores,
    roc,
    search,
    tar_at_far,
    template_features,
)
from tests.conftest import SHARED_LFW, make_ijb


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_ijb(tmp_path_factory.mktemp("ijb") / "IJBC")


def test_read_ijb_gives_each_face_its_points_score_template_and_media(release):
    protocol = read_ijb(release)
    assert len(protocol.images) == 36 and protocol.landmarks.shape == (36, 5, 2)
    assert protocol.images[:3] == [
        "1_0_AJ_Cook_0001.jpg",
        "2_1_AJ_Cook_0001.jpg",
        "2_2_AJ_Cook_0001.jpg",
    ]
    assert protocol.templates[:3].tolist() == [1, 2, 2] and protocol.medias[:3].tolist() == [
        1001,
        1002,
        1002,
    ]
    assert protocol.pairs.shape == (48, 2) and protocol.labels.sum() == 12
    assert protocol.pairs[0].tolist() == [1, 2] and protocol.labels[0]
    assert 0.6 <= protocol.scores.min() and protocol.scores.max() <= 1.0


def test_a_face_is_aligned_back_onto_the_crop_its_photo_was_made_from(release):
    # make_ijb moved each LFW crop into a larger photo by a rotation, a scale and a
    # shift, and the five reference points with it (plus noise): aligning by those
    # points gives the crop back, short of interpolation and JPEG losses
    protocol = read_ijb(release)
    faces = IJBFaces(protocol, 112)
    for i, name in enumerate(protocol.images[:6]):
        stem = name.split("_", 2)[2]
        want = decode_image(str(SHARED_LFW / stem.rsplit("_", 1)[0] / stem)).int()
        got = faces[i]
        assert got.shape == (112, 112, 3) and got.dtype == torch.uint8
        inner = (got.int() - want).abs()[8:-8, 8:-8].float().mean()
        assert inner < 4, (name, inner)
    # points 6 pixels off give another crop: the points are what aligns
    moved = IJBFaces(dataclasses.replace(protocol, landmarks=protocol.landmarks + 6), 112)
    assert (moved[0].int() - faces[0].int()).abs()[8:-8, 8:-8].float().mean() > 15
    # a model of another input size gets the same framing, at its size
    small = IJBFaces(protocol, 56)[0].permute(2, 0, 1)[None].float()
    half = torch.nn.functional.avg_pool2d(faces[0].permute(2, 0, 1)[None].float(), 2)
    assert (small - half).abs()[..., 4:-4, 4:-4].mean() < 6


def _warp(image: np.ndarray, inverse: np.ndarray, size: int) -> np.ndarray:
    """OpenCV's warpAffine with a black border, written out: each output pixel's place
    in the photo, its four neighbours' bilinear weights, black where one is outside."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    px = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    py = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
    out = np.zeros((size, size, 3))
    for dx, dy in [(0, 0), (1, 0), (0, 1), (1, 1)]:
        x, y = x0 + dx, y0 + dy
        weight = (1 - np.abs(px - x)) * (1 - np.abs(py - y))
        inside = (0 <= x) & (x < image.shape[1]) & (0 <= y) & (y < image.shape[0])
        out[inside] += weight[inside, None] * image[y[inside], x[inside]]
    return np.clip(np.round(out), 0, 255)


def test_alignment_samples_the_photo_as_warpaffine_wherever_the_face_lies():
    # align_face samples only the part of the photo the face reaches; a face anywhere
    # (inside, across an edge, bigger than the photo, wholly outside) in a photo of
    # any size gives warpAffine's pixels, black outside the photo
    rng = np.random.default_rng(0)
    for trial in range(60):
        height, width = rng.integers(2, 40, 2) if trial % 3 == 0 else rng.integers(60, 700, 2)
        photo = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        turn = rng.uniform(-0.6, 0.6)
        rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
        centre = rng.uniform(-0.5, 1.5, 2) * [width, height]
        points = (REFERENCE - REFERENCE.mean(0)) @ rotation.T * rng.uniform(0.3, 3) + centre
        size = (112, 64)[trial % 2]
        matrix = similarity_transform(points, REFERENCE * (size / 112))
        inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
        got = align_face(torch.from_numpy(photo), points, size).numpy()
        want = _warp(photo, inverse, size)
        assert np.abs(got - want).max() <= 1, trial


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """An embedding any face set separates: the centred pixels inside the border."""
    flat = x[..., 8:-8, 8:-8].flatten(1)
    return flat - flat.mean(dim=1, keepdim=True)


def test_the_whole_protocol_matches_every_pair_of_one_face_and_needs_the_points(release):
    # make_ijb's pairs of one person are one photo placed three times: aligned by their
    # points, read, mirrored, weighted, pooled and scored, every such pair is above
    # every pair of two people, whatever the FAR; points 6 pixels off at random are not
    protocol = read_ijb(release)
    result, scores = evaluate_ijb(_pixels, protocol, 112)
    assert scores[protocol.labels].min() > 0.95 > 0.85 > scores[~protocol.labels].max()
    one = result.verification
    assert [row["tar"] for row in one.rows] == [1.0] * 6
    assert (result.faces, one.templates, one.genuine, one.impostor) == (36, 24, 12, 36)
    assert result.identification is None
    noise = np.random.default_rng(0).normal(0, 6, protocol.landmarks.shape)
    off = dataclasses.replace(protocol, landmarks=protocol.landmarks + noise)
    result, _ = evaluate_ijb(_pixels, off, 112, batch_size=5, workers=2)
    assert result.verification.rows[2]["tar"] < 0.9


def test_1n_reads_the_galleries_and_probes_and_finds_every_mated_probe_first(release, tmp_path):
    # make_ijb: G1 holds people 0-3's first templates, G2 people 4-7's; every second
    # template is a probe, people 8-11's in neither gallery. Each probe is its gallery
    # template's photo placed again: aligned and pooled, every mated probe is found
    # first and above every non-mated probe's best score, at every FPIR
    protocol = read_ijb(release, protocols=("1:N",))
    assert protocol.pairs is None and protocol.labels is None  # 1:1's list not read
    g1, g2 = protocol.galleries
    assert (g1.name, g1.templates.tolist(), g1.subjects.tolist()) == (
        "G1",
        [1, 3, 5, 7],
        [100, 101, 102, 103],
    )
    assert g2.templates.tolist() == [9, 11, 13, 15]
    assert protocol.probes.templates.tolist() == list(range(2, 25, 2))
    assert protocol.probes.subjects.tolist() == list(range(100, 112))
    ijbb = read_ijb(make_ijb(tmp_path / "IJBB", target="IJBB"), "IJBB", ("1:N",))
    assert [g.path.name for g in ijbb.galleries] == [
        "ijbb_1N_gallery_S1.csv",
        "ijbb_1N_gallery_S2.csv",
    ]
    both = read_ijb(release, protocols=("1:1", "1:N"))
    result, scores = evaluate_ijb(_pixels, both, 112)
    search_ = result.identification
    assert search_.probes == 12 and search_.ranks == [1, 5, 10]
    for gallery in search_.galleries:
        assert (gallery["templates"], gallery["mated"], gallery["nonmated"]) == (4, 4, 8)
        assert gallery["rank_rates"] == [1.0, 1.0, 1.0]
        assert [row["tpir"] for row in gallery["rows"]] == [1.0] * 4
        # 8 non-mated probes: ceil(8 x FPIR) = 1 at each FPIR, the best of them, which
        # none passes
        assert {row["fpir_reached"] for row in gallery["rows"]} == {0.0}
    assert search_.mean == {"rank_rates": [1.0] * 3, "tpir": [1.0] * 4}
    # both protocols from one embedding: 1:1's figures are those of 1:1 alone
    alone, alone_scores = evaluate_ijb(_pixels, read_ijb(release), 112)
    assert result.verification == alone.verification
    np.testing.assert_array_equal(scores, alone_scores)
    # the points of G1's people (gallery and probes) 6 pixels off at random: its probes
    # are found less often, G2's as before; the mean row is the mean of the two
    noise = np.random.default_rng(0).normal(0, 6, protocol.landmarks.shape)
    noise[protocol.templates > 2 * len(g1.templates)] = 0
    off = dataclasses.replace(protocol, landmarks=protocol.landmarks + noise)
    worse = evaluate_ijb(_pixels, off, 112)[0].identification
    first, second = ([row["tpir"] for row in g["rows"]] for g in worse.galleries)
    assert second == [1.0] * 4 and first[-1] < 1.0
    assert worse.mean["tpir"] == [(a + b) / 2 for a, b in zip(first, second, strict=True)]
    # 1:1's template count is that of the templates its pairs name
    few = dataclasses.replace(both, pairs=both.pairs[:4], labels=both.labels[:4])
    assert evaluate_ijb(_pixels, few, 112)[0].verification.templates == 5


def test_1n_rank_and_tpir_at_fpir_are_ijb_evals_figures_on_a_worked_example():
    # a gallery of one-hot templates (subjects 1, 2, 3): each probe's row is its scores
    gallery, gallery_subjects = np.eye(3), np.array([1, 2, 3])
    probes = np.array(
        [
            [0.9, 0.2, 0.1],  # subject 1: rank 1
            [0.7, 0.6, 0.1],  # subject 2: rank 2
            [0.1, 0.5, 0.5],  # subject 3: tied with subject 2, counted against: rank 2
            [0.8, 0.3, 0.2],  # subject 1: rank 1, its score equal to a non-mated best
            [0.95, 0.0, 0.0],  # subjects 7, 8, 9, 6, in no gallery: best scores 0.95,
            [0.1, 0.8, 0.3],  # 0.8, 0.5, 0.3
            [0.5, 0.2, 0.1],
            [0.3, 0.3, 0.1],
        ]
    )
    probe_subjects = np.array([1, 2, 3, 1, 7, 8, 9, 6])
    fpirs = (0.25, 0.3, 0.5, 1.0)
    found = search(probes, probe_subjects, gallery, gallery_subjects, fpirs, (1, 2))
    assert (found["templates"], found["mated"], found["nonmated"]) == (3, 4, 4)
    assert found["hits"] == [2, 4]
    rows = found["rows"]
    # the ceil(4 x FPIR)-th highest non-mated best score: the 1st, 2nd (ceil 1.2), 2nd,
    # 4th; a mated probe counts when first and strictly above it: none above 0.95, the
    # one at 0.9 above 0.8 (the one at 0.8 is not), both above 0.3
    assert [r["threshold"] for r in rows] == [0.95, 0.8, 0.8, 0.3]
    assert [r["tpir"] for r in rows] == [0.0, 0.25, 0.25, 0.5]
    # ceil(4 x FPIR) - 1 non-mated probes pass the threshold
    assert [r["fpir_reached"] for r in rows] == [0.0, 0.25, 0.25, 0.75]
    # IJB_evals.py's FPIRs are 10 ** np.arange(-4, 0, 0.04): its 1e-1 is a little more,
    # so of 10 non-mated probes, the 2nd highest best score is the threshold, not the 1st
    assert FPIRS == (1e-4, 0.001000000000000002, 0.01000000000000004, 0.10000000000000062)
    ten = np.array([[0.9 - 0.1 * i, 0.0, 0.0] for i in range(10)])
    found_ten = search(
        np.r_[probes[:1], ten], np.r_[1, np.arange(20, 30)], gallery, gallery_subjects
    )
    assert found_ten["rows"][3]["threshold"] == 0.8 and found_ten["rows"][3]["tpir"] == 1.0
    assert found_ten["rows"][3]["fpir_reached"] == 0.1
    # chunked or not, the same
    again = search(probes, probe_subjects, gallery, gallery_subjects, fpirs, (1, 2), chunk=3)
    assert again == found


def test_the_similarity_transform_is_the_least_squares_one_without_reflection():
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = REFERENCE @ rotation.T + shift
    matrix = similarity_transform(moved, REFERENCE)  # moved -> reference
    back = moved @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(back, REFERENCE, atol=1e-9)
    # mirrored points: the best rotation and scale, never a reflection
    mirrored = REFERENCE * [-1, 1]
    m = similarity_transform(mirrored, REFERENCE)[:, :2]
    assert np.linalg.det(m) > 0
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.ones((5, 2)), REFERENCE)


def test_a_template_is_the_sum_of_its_medias_averages_of_score_weighted_faces():
    features = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    scores = np.array([1.0, 0.5, 1.0, 0.8], dtype=np.float32)
    templates = np.array([7, 7, 7, 3])
    medias = np.array([1, 1, 2, 5])  # template 7: faces 0 and 1 are one video's frames
    feats, ids = template_features(features, scores, templates, medias)
    assert ids.tolist() == [3, 7]
    # media 1: mean([1, 0], [0, 1]) = [0.5, 0.5]; media 2: [3, 0]; sum [3.5, 0.5]
    np.testing.assert_allclose(feats[1], np.array([3.5, 0.5]) / np.hypot(3.5, 0.5))
    np.testing.assert_allclose(feats[0], [0.0, 1.0])
    score = pair_scores(feats, ids, np.array([[7, 3], [3, 3]]))
    np.testing.assert_allclose(score, [0.5 / np.hypot(3.5, 0.5), 1.0])


def test_roc_and_tar_at_far_are_scikit_learns_curve_and_arcface_torchs_pick():
    labels = np.array([1, 1, 0, 1, 0, 0, 0, 1, 0, 0], dtype=bool)
    scores = np.array([0.9, 0.8, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.3, 0.1])
    fpr, tpr, thresholds = roc(labels, scores)
    # worked by hand: at thresholds 0.9, 0.8 (a tie of one of each), 0.7, 0.6, 0.5, 0.4,
    # 0.3 (a tie) and 0.1 the pairs of two people passing are 0, 1, 1, 2, 3, 4, 5, 6 and
    # of one person 1, 2, 3, 3, 3, 3, 4, 4; 0.6 and 0.5 lie inside the straight run from
    # 0.7 to 0.4 and are dropped, as scikit-learn's drop_intermediate drops them
    assert thresholds.tolist() == [np.inf, 0.9, 0.8, 0.7, 0.4, 0.3, 0.1]
    np.testing.assert_allclose(fpr * 6, [0, 0, 1, 1, 4, 5, 6])
    np.testing.assert_allclose(tpr * 4, [0, 1, 2, 3, 3, 4, 4])
    rows = tar_at_far(labels, scores, (0.0, 0.2, 0.5, 0.99))
    # FAR 0: the point at 0.9 (FAR 0 at 0.9 and at inf: the lower threshold); 0.2: FAR
    # 1/6 at 0.7 (TAR 3/4) and at 0.8 (2/4): 0.7; 0.5: 4/6 at 0.4 is nearer than 1/6
    assert [r["tar"] for r in rows] == [0.25, 0.75, 0.75, 1.0]
    assert [r["threshold"] for r in rows] == [0.9, 0.7, 0.4, 0.1]
    assert rows[1]["far_reached"] == pytest.approx(1 / 6) and rows[1]["threshold"] == 0.7
    # a FAR nearest the point above every score: its threshold is None (JSON has no inf)
    top = tar_at_far(~labels, scores, (0.0,))[0]
    assert top == {"far": 0.0, "tar": 0.0, "far_reached": 0.0, "threshold": None}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda r: (r / "meta" / "ijbc_face_tid_mid.txt").unlink(),
            "ijbc_face_tid_mid.txt is missing",
        ),
        (
            lambda r: _edit(r, "name_5pts_score", 2, lambda f: f[:-1]),
            r"ijbc_name_5pts_score.txt, line 2: 11 fields, expected 12",
        ),
        (
            lambda r: _edit(r, "name_5pts_score", 3, lambda f: [f[0], "nan", *f[2:]]),
            r"line 3: a value that is not finite",
        ),
        (
            lambda r: _edit(r, "face_tid_mid", 4, lambda f: ["x.jpg", *f[1:]]),
            r"ijbc_face_tid_mid.txt, line 4 names x.jpg where .*ijbc_name_5pts_score.txt "
            r"names 3_3_AJ_Lamas_0001.jpg",
        ),
        (
            lambda r: _edit(r, "template_pair_label", 5, lambda f: [*f[:2], "2"]),
            r"ijbc_template_pair_label.txt, line 5: label 2, expected 1",
        ),
        (
            lambda r: _edit(r, "template_pair_label", 6, lambda f: ["999", *f[1:]]),
            r"line 6: template 999 holds no face of .*ijbc_face_tid_mid.txt",
        ),
        (
            lambda r: _edit(r, "template_pair_label", 6, lambda f: ["a", *f[1:]]),
            r"ijbc_template_pair_label.txt, line 6: 'a 6 0': expected three integers a line",
        ),
        (  # a blank line above: lines, not numpy's rows, are named
            lambda r: _edit(r, "template_pair_label", 6, lambda f: ["\n1", f[1], "7"]),
            r"ijbc_template_pair_label.txt, line 7: label 7, expected 1",
        ),
        (
            lambda r: (r / "meta" / "ijbc_template_pair_label.txt").write_text(""),
            r"ijbc_template_pair_label.txt lists no pairs",
        ),
        (
            lambda r: _edit(r, "name_5pts_score", 2, lambda f: [f[0], *["5"] * 10, f[-1]]),
            r"ijbc_name_5pts_score.txt, line 2: its five points coincide",
        ),
        (
            lambda r: (r / "loose_crop" / "2_2_AJ_Cook_0001.jpg").unlink(),
            r"loose_crop/2_2_AJ_Cook_0001.jpg does not exist \(1 of the 12 images",
        ),
    ],
)
def test_a_release_with_a_missing_or_malformed_file_is_refused_naming_the_file_and_line(
    tmp_path, edit, message
):
    root = make_ijb(tmp_path / "IJBC", people=4)
    edit(root)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_ijb(root)


def test_an_image_that_cannot_be_decoded_or_embedded_is_named_in_one_line(tmp_path):
    # with workers, the dataset's error came inside the worker's traceback; embeddings
    # that are not finite (a diverged export) gave a table of meaningless figures
    root = make_ijb(tmp_path / "IJBC", people=4)
    protocol = read_ijb(root)
    (root / "loose_crop" / protocol.images[5]).write_bytes(b"not a jpeg")
    for workers in (0, 2):
        with pytest.raises(ValueError) as err:
            evaluate_ijb(_pixels, protocol, 64, batch_size=4, workers=workers)
        assert str(err.value).startswith(f"{root}/loose_crop/{protocol.images[5]} cannot be ")
        assert "\n" not in str(err.value)
    protocol = read_ijb(make_ijb(tmp_path / "again", people=4))
    with pytest.raises(
        ValueError,
        match=r"the embeddings of 12 faces are not finite .* the "
        rf"first {protocol.image_dir / protocol.images[0]}'s",
    ):
        evaluate_ijb(lambda x: _pixels(x) * torch.nan, protocol, 64)


def test_an_image_with_an_exif_orientation_is_turned_as_opencv_reads_it(tmp_path):
    # eval_ijbc.py reads with cv2.imread, which turns a JPEG as its EXIF orientation
    # says, and the release's points were found on the turned image
    from PIL import Image

    from facecluster.data.ijb import upright_image

    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: shown after a quarter turn clockwise
    path = tmp_path / "turned.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    upright = upright_image(path.read_bytes())
    assert upright.shape == (40, 20, 3)
    assert upright[:18].float().mean() > 200 > 50 > upright[22:].float().mean()  # left is up
    plain = tmp_path / "plain.jpg"
    Image.fromarray(pixels).save(plain, quality=95)
    assert upright_image(plain.read_bytes()).shape == (20, 40, 3)


@pytest.mark.parametrize(
    ("kind", "edit", "message"),
    [
        ("1N_probe_mixed", lambda rows: rows[:1], r"ijbc_1N_probe_mixed.csv lists no templates"),
        (
            "1N_gallery_G1",
            lambda rows: [*rows[:2], "3,100,x.jpg", *rows[3:]],
            r"ijbc_1N_gallery_G1.csv, line 3: subject 100 has a second template, 3 \(its "
            r"first, 1, is on line 2\): a gallery holds one template per subject",
        ),
        (
            "1N_gallery_G1",
            lambda rows: [*rows, "1,555,y.jpg"],
            r"ijbc_1N_gallery_G1.csv, line 6: template 1 of subject 555, where line 2 gives "
            r"it subject 100",
        ),
        (
            "1N_gallery_G1",
            lambda rows: [*rows, "99,555,y.jpg"],
            r"ijbc_1N_gallery_G1.csv, line 6: template 99 holds no face of .*face_tid_mid",
        ),
        (
            "1N_gallery_G1",
            lambda rows: [*rows[:3], "7;103;x.jpg"],
            r"ijbc_1N_gallery_G1.csv, line 4: '7;103;x.jpg': expected a template id and a "
            r"subject id first",
        ),
        (
            "1N_gallery_G2",
            lambda rows: [*rows, "17,100,z.jpg"],
            r"ijbc_1N_gallery_G1.csv and .*ijbc_1N_gallery_G2.csv both hold subject 100",
        ),
        (  # one template in both galleries, of two subjects
            "1N_gallery_G2",
            lambda rows: [*rows, "1,555,z.jpg"],
            r"ijbc_1N_gallery_G1.csv and .*ijbc_1N_gallery_G2.csv both hold template 1",
        ),
        (
            "1N_gallery_G2",
            lambda rows: [*rows, "2,555,z.jpg"],
            r"template 2 is both a probe \(.*ijbc_1N_probe_mixed.csv\) and in the gallery "
            r".*ijbc_1N_gallery_G2.csv",
        ),
        (
            "1N_probe_mixed",
            lambda rows: [r for r in rows if not r.startswith(("2,", "4,", "6,", "8,"))],
            r"no probe of .*ijbc_1N_probe_mixed.csv is of a subject in .*ijbc_1N_gallery_G1",
        ),
        (  # probes of G1's subjects alone: none to reject
            "1N_probe_mixed",
            lambda rows: [rows[0], *(r for r in rows[1:] if int(r.split(",")[1]) < 104)],
            r"every probe of .*ijbc_1N_probe_mixed.csv is of a subject in .*gallery_G1.csv",
        ),
        (
            "1N_gallery_G2",
            lambda rows: (_ for _ in ()).throw(FileNotFoundError),
            r"IJBC lacks 1:N lists: .*ijbc_1N_gallery_G2.csv is missing \(InsightFace's "
            r"updated IJB meta files hold them",
        ),
    ],
)
def test_1n_lists_that_disagree_are_refused_naming_the_file_and_line(
    tmp_path, release, kind, edit, message
):
    root = tmp_path / "IJBC"
    shutil.copytree(release, root)
    path = root / "meta" / f"ijbc_{kind}.csv"
    try:
        rows = edit(path.read_text().splitlines())
        path.write_text("\n".join(rows) + "\n")
    except FileNotFoundError:
        path.unlink()
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_ijb(root, protocols=("1:N",))
    if "missing" in message:  # 1:1 does not need it
        assert read_ijb(root).galleries == ()


def test_a_folder_that_is_no_release_or_a_target_it_lacks_is_refused(tmp_path, release):
    with pytest.raises(FileNotFoundError, match="not an IJB release's IJBC folder"):
        read_ijb(tmp_path)
    with pytest.raises(
        FileNotFoundError,
        match=r"ijbb_name_5pts_score.txt.* missing; it holds IJBC's lists: give --target IJBC",
    ):
        read_ijb(release, "IJBB")


def _edit(root, kind, line, change):
    path = root / "meta" / f"ijbc_{kind}.txt"
    lines = path.read_text().splitlines()
    lines[line - 1] = " ".join(change(lines[line - 1].split()))
    path.write_text("\n".join(lines) + "\n")


def test_protocol_given_twice_runs_both(monkeypatch, tmp_path, release):
    # argparse kept the last --protocol alone: the 1:N asked first was dropped, exit 0
    from facecluster import cli, deploy

    asked = []

    def stop(*args):
        asked.append(args[7])
        raise ValueError("stopped here")

    monkeypatch.setattr(deploy, "ijb_export", stop)
    (tmp_path / "export").mkdir()
    argv = [str(tmp_path / "export"), str(release), "--out", str(tmp_path / "out.json")]
    assert cli.ijb_main([*argv, "--protocol", "1:N", "--protocol", "1:1"]) == 2
    assert cli.ijb_main(argv) == 2
    assert asked == [("1:N", "1:1"), ("1:1",)]
