from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.batch import qc_picture, save_qc_picture


def _volume():
    """A 20 x 24 x 16 RAS volume, 2 x 1 x 3 mm voxels, bright in the right-anterior-superior corner."""
    image = np.zeros((20, 24, 16), np.float32)
    image[1:-1, 1:-1, 1:-1] = 100.0
    image[14:19, 18:23, 11:15] = 500.0  # high x, y, z: right, anterior, superior in RAS
    labels = np.zeros(image.shape, np.uint8)
    labels[14:19, 18:23, 11:15] = 1
    return image, labels, np.diag([2.0, 1.0, 3.0, 1.0])


def _bright(panel: np.ndarray) -> tuple[float, float]:
    """Centre (row, column) of the reddest pixels, as fractions of the panel size."""
    red = (panel[..., 0].astype(int) - panel[..., 2].astype(int)) > 60
    rows, cols = np.nonzero(red)
    return rows.mean() / panel.shape[0], cols.mean() / panel.shape[1]


def test_radiological_view_whatever_the_storage_order():
    image, labels, affine = _volume()
    point = [16, 20, 13]
    ras = np.asarray(qc_picture(image, labels, affine, point=point))
    # the same volume stored LPS-first (x and y reversed), as DICOM often is
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [19, 23]
    lps_affine = affine @ flip
    lps = np.asarray(qc_picture(image[::-1, ::-1].copy(), labels[::-1, ::-1].copy(), lps_affine,
                                point=[19 - point[0], 23 - point[1], point[2]]))
    np.testing.assert_array_equal(ras, lps)
    # true aspect: the 40 x 24 x 48 mm field of view at 48 mm per 320 px: axial 267 x 160 px,
    # coronal 267 x 320, sagittal 160 x 320, 4 px apart, 16 px captions above and below
    assert ras.shape == (320 + 32, 267 + 267 + 160 + 8, 3)
    axial = ras[16:16 + round(24 / 48 * 320), : round(40 / 48 * 320)]
    row, col = _bright(axial)
    assert row < 0.35 and col < 0.35  # anterior at the top, patient's right on the viewer's left


def test_default_point_and_file_written_atomically(tmp_path):
    image, labels, affine = _volume()
    path = save_qc_picture(tmp_path / "qc.png", image, labels, affine, caption="case-x tumor 1.0 mL")
    with Image.open(path) as picture:
        assert picture.mode == "RGB" and picture.width > 3 * 100
    assert [p.name for p in tmp_path.iterdir()] == ["qc.png"]
    save_qc_picture(tmp_path / "qc.png", image, labels, affine, thumbnail=tmp_path / "qc_thumbnail.png")
    with Image.open(path) as picture, Image.open(tmp_path / "qc_thumbnail.png") as thumbnail:
        assert thumbnail.width == 420 and abs(thumbnail.height - picture.height * 420 / picture.width) < 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qc.png", "qc_thumbnail.png"]
    with pytest.raises(ValueError, match="one shape"):
        qc_picture(image, labels[:-1], affine)


def test_one_row_per_named_channel():
    """A multi-parametric case: FLAIR and T1c rows, each with its three views and the same labels."""
    image, labels, affine = _volume()
    single = np.asarray(qc_picture(image, labels, affine, point=[16, 20, 13]))
    plain = np.where(image > 0, 100.0, 0.0).astype(np.float32)  # a channel where the lesion does not show
    rows = np.asarray(qc_picture({"t2f": image, "t1c": plain}, labels, affine, point=[16, 20, 13], caption="x"))
    assert rows.shape == (2 * (320 + 16) + 16, single.shape[1], 3)
    top, bottom = rows[16:16 + 320], rows[336 + 16:336 + 16 + 320]
    np.testing.assert_array_equal(top, single[16:16 + 320])  # the first row is that channel's picture
    assert _bright(top[:, :267]) == pytest.approx(_bright(bottom[:, :267]), abs=0.02)  # the labels in both rows
    assert not np.array_equal(top, bottom)
    with pytest.raises(ValueError, match="`image` t1c and `labels` must be 2D or 3D arrays of one shape"):
        qc_picture({"t2f": image, "t1c": image[:-1]}, labels, affine)


def test_the_brain_outline_is_drawn_on_every_view():
    """A whole head's extracted brain: its border in the outline colour on the three views (and the
    labels' colours kept inside); nothing of that colour without an outline."""
    from pipelines.batch.qc import OUTLINE_RGB

    image = np.full((30, 34, 26), 100.0, np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[14:17, 15:19, 12:15] = 1
    brain = np.zeros(image.shape, bool)
    brain[5:25, 6:28, 4:22] = True
    plain = np.asarray(qc_picture(image, labels, np.eye(4), point=(15, 17, 13)))
    drawn = np.asarray(qc_picture(image, labels, np.eye(4), point=(15, 17, 13), outline=brain))
    colour = (drawn == OUTLINE_RGB).all(-1)
    assert not (plain == OUTLINE_RGB).all(-1).any()
    panel_width = drawn.shape[1] // 3
    for view in range(3):  # each of axial, coronal, sagittal holds a closed border
        assert colour[:, view * panel_width:(view + 1) * panel_width].sum() > 40
    assert (drawn[~colour] == plain[~colour]).all()
    with pytest.raises(ValueError, match=r"`outline` must have the labels' shape \(30, 34, 26\)"):
        qc_picture(image, labels, np.eye(4), outline=brain[:-1])
