"""One reading path for every slice: image modes, 16-bit, EXIF, ICC profiles without libpng noise, mixed sizes,
and Predictor feeding the model exactly the slices the eval pipeline feeds."""

import io
import re
import warnings

import cv2
import jax
import numpy as np
import pytest
from PIL import Image, ImageCms

import demo_configs
from resdense_jax import data, explain, predict, train
from resdense_jax.data import scans, synthetic

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 7, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, (6, 7), dtype=np.uint8)
WIDE = (RNG.integers(0, 4096, (6, 7)) + 100).astype(np.uint16)  # 12-bit values, as CT exports hold


def _luma(rgb: np.ndarray) -> np.ndarray:
  return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def _png(image: Image.Image, **options) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, "PNG", **options)
  return buffer.getvalue()


def _palette() -> Image.Image:
  return Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)


# name -> (encoded bytes, expected uint8 grey, tolerance in grey levels)
MODES = {
    "grey": lambda: (_png(Image.fromarray(GREY)), GREY, 0),
    "rgb": lambda: (_png(Image.fromarray(RGB)), _luma(RGB), 1),
    "rgba_alpha_ignored": lambda: (_png(Image.fromarray(np.dstack([RGB, GREY]), "RGBA")), _luma(RGB), 1),
    "grey_alpha_ignored": lambda: (_png(Image.fromarray(np.dstack([GREY, RGB[..., 0]]), "LA")), GREY, 0),
    "palette": lambda: (_png(_palette()), _luma(np.asarray(_palette().convert("RGB"))), 1),
    "palette_transparency": lambda: (_png(_palette(), transparency=0),
                                     _luma(np.asarray(_palette().convert("RGB"))), 1),
    "one_bit": lambda: (_png(Image.fromarray(GREY > 127)), np.where(GREY > 127, 255, 0), 0),
    "sixteen_bit_by_its_range": lambda: (_png(Image.fromarray(WIDE)),
                                         (WIDE - WIDE.min()) * 255.0 / (WIDE.max() - WIDE.min()), 0.5),
    "sixteen_bit_rgb": lambda: (cv2.imencode(".png", np.dstack([WIDE] * 3))[1].tobytes(),
                                (WIDE - WIDE.min()) * 255.0 / (WIDE.max() - WIDE.min()), 1),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_image_mode_decodes_to_its_grey_level(tmp_path, mode):
  encoded, want, tolerance = MODES[mode]()
  path = tmp_path / f"{mode}.png"
  path.write_bytes(encoded)
  got = scans.read_image_slice(path)
  assert got.dtype == np.uint8 and got.shape == (6, 7)
  np.testing.assert_allclose(got.astype(np.float64), want, atol=tolerance, rtol=0)


def test_constant_sixteen_bit_slice_is_black(tmp_path):
  path = tmp_path / "flat.png"
  path.write_bytes(_png(Image.fromarray(np.full((4, 4), 3000, np.uint16))))
  np.testing.assert_array_equal(scans.read_image_slice(path), np.zeros((4, 4), np.uint8))


def test_exif_orientation_is_applied(tmp_path):
  image = np.zeros((4, 8), np.uint8)
  image[0] = 255  # a white top row on a wide slice
  exif = Image.Exif()
  exif[0x0112] = 6  # stored rotated: display turns it 90 degrees clockwise
  path = tmp_path / "rotated.jpg"
  Image.fromarray(image).save(path, "JPEG", quality=100, exif=exif.tobytes())
  got = scans.read_image_slice(path)
  assert got.shape == (8, 4)
  assert got[:, -1].min() > 200 and got[:, 0].max() < 50  # the top row is now the right column


def _profiled_pngs(tmp_path):
  """Grey PNGs carrying ICC profiles libpng complains about: an RGB profile, and a truncated one."""
  grey = Image.fromarray(GREY)
  srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
  paths = [tmp_path / "rgb_profile.png", tmp_path / "short_profile.png"]
  paths[0].write_bytes(_png(grey, icc_profile=srgb))
  paths[1].write_bytes(_png(grey, icc_profile=b"not a profile" * 4))
  return paths


def test_icc_profiles_decode_without_libpng_warnings(tmp_path, capfd):
  paths = _profiled_pngs(tmp_path)
  capfd.readouterr()
  for path in paths:  # The reproduction: OpenCV's libpng prints on the process's stderr (fd 2).
    cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_GRAYSCALE)
  assert len(re.findall(r"libpng warning: iCCP", capfd.readouterr().err)) == 2
  for path in paths:
    np.testing.assert_array_equal(scans.read_image_slice(path), GREY)
  assert "iCCP" not in capfd.readouterr().err


@pytest.mark.parametrize("cut", ["in_the_profile", "in_the_pixels", "before_the_end"])
def test_truncated_png_still_raises_naming_the_file(tmp_path, cut):
  encoded = _profiled_pngs(tmp_path)[0].read_bytes()
  iccp = encoded.index(b"iCCP")
  stop = {"in_the_profile": iccp + 40, "in_the_pixels": encoded.index(b"IDAT") + 20,
          "before_the_end": len(encoded) - 6}[cut]
  path = tmp_path / "truncated.png"
  path.write_bytes(encoded[:stop])
  with pytest.raises(data.SliceError, match=re.escape(str(path)) + ".*cannot be decoded"):
    scans.read_image_slice(path)


def test_truncated_nifti_volume_is_one_error_naming_the_file(tmp_path):
  scan, _ = synthetic.synthetic_scan(0, covid=False, num_slices=4, slice_size=16)
  file = synthetic.write_nifti(scan, tmp_path / "volume.nii")
  file.write_bytes(file.read_bytes()[:-100])
  with warnings.catch_warnings():
    warnings.simplefilter("error", data.DataWarning)  # not one skipped-slice warning per slice
    with pytest.raises(data.ScanError, match=re.escape(str(file)) + ": unreadable NIfTI volume"):
      data.read_scan(file)


# ---------------------------------------------------------------------------------- a scan of mixed slices


def _mixed_scan(folder):
  """A scan whose slices differ in size, mode and format (each a gradient, so resizing shows)."""
  folder.mkdir(parents=True)
  ramp = lambda h, w: (np.add.outer(np.arange(h) * 3, np.arange(w) * 2) % 256).astype(np.uint8)  # noqa: E731
  Image.fromarray(ramp(40, 36)).save(folder / "0.png")
  Image.fromarray(np.dstack([ramp(38, 40)] * 3)).save(folder / "1.png")
  Image.fromarray(np.dstack([ramp(40, 40)] * 3 + [ramp(40, 40)])).save(folder / "2.png")  # RGBA
  Image.fromarray(np.dstack([ramp(36, 44)] * 3)).convert("P").save(folder / "3.png")
  Image.fromarray(ramp(40, 40).astype(np.uint16) * 200).save(folder / "4.png")  # 16-bit
  Image.fromarray(ramp(42, 40)).save(folder / "5.jpg", quality=95)
  folder.joinpath("6.png").write_bytes(_png(Image.fromarray(ramp(40, 40)), icc_profile=b"xx" * 20))
  return folder


@pytest.fixture(scope="module")
def predictor():
  """A tiny random-init Res-Dense Net (32 px inputs): enough to check what reaches the model."""
  config = demo_configs.tiny_config()
  model = train.create_model(config.model)
  variables = train.initialized(jax.random.key(0, impl="rbg"), model, config.data.image_size)
  return predict.Predictor(model, variables, config, batch_size=8)


def _recording(predictor):
  """Wraps the predictor's compiled step so the batches it feeds the model are kept."""
  fed, step = [], predictor._eval_fn

  def record(variables, images):
    fed.append(np.asarray(images))
    return step(variables, images)

  predictor._eval_fn = record
  return fed, step


def _eval_pipeline_images(folder, config, options=None):
  """The uint8 model inputs the evaluation pipeline feeds for one scan folder, in slice order."""
  source = data.RawScans([data.ScanRef("s", folder, None, "")], options=options, progress=False)
  batches = list(data.eval_pipeline(source, image_size=config.data.image_size, batch_size=8))
  return np.concatenate([b["image"][b["mask"]] for b in batches])


def test_mixed_sizes_and_modes_predict_with_the_eval_pipeline_slices(tmp_path, predictor, capfd):
  folder = _mixed_scan(tmp_path / "mixed")
  fed, step = _recording(predictor)
  try:
    prediction = predictor.predict(folder)
  finally:
    predictor._eval_fn = step
  assert prediction.n_slices == 7 and 0.0 <= prediction.p_covid <= 1.0
  assert prediction.slice_indices.tolist() == list(range(7))
  want = _eval_pipeline_images(folder, predictor.config)
  assert want.shape == (7, 32, 32, 3)
  np.testing.assert_array_equal(np.concatenate(fed)[:7], want)
  assert "iCCP" not in capfd.readouterr().err
  # read_scan keeps working on the same folder: the odd sizes resized to the most common one, named.
  with pytest.warns(data.DataWarning, match=r"mixed slice sizes.*most slices are 40x40 but 0\.png is 40x36"):
    scan = data.read_scan(folder)
  assert scan.slices.shape == (7, 40, 40)


def test_explain_takes_the_mixed_scan_too(tmp_path, predictor):
  folder = _mixed_scan(tmp_path / "mixed")
  with pytest.warns(data.DataWarning, match="mixed slice sizes"):  # the figures show one size: 40x40
    explanation = explain.explain_scan(predictor, folder)
  assert explanation.maps.shape == explanation.scan.slices.shape == (7, 40, 40)
  _, slice_probs = predictor.predict_scan(folder)
  np.testing.assert_allclose(explanation.slice_probs, slice_probs, atol=1e-6)
