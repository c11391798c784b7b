"""Command line of the weight loader.

  python -m resdense_jax.weights list
  python -m resdense_jax.weights convert --keras=FILE.h5 --arch=resnet101 [--include_top] [--pooling=avg] --out=DIR

`convert` reads a Keras weight file (a path or a published file name, fetched like `load_keras` does) into the
Flax variables of `models.BACKBONES[arch]` and writes them as an orbax checkpoint that `weights.load_converted`
restores.
"""

from __future__ import annotations

import argparse
import sys

from resdense_jax import models
from resdense_jax.weights import checkpoint, download, loader, registry
from resdense_jax.weights.errors import WeightsError


def _list(args: argparse.Namespace) -> None:
  cache = download.keras_cache_dir()
  rows = [("arch", "top", "cached", "md5", "file"), *(
      (e.arch, "yes" if e.include_top else "no", "yes" if (cache / e.file_name).is_file() else "no", e.md5,
       e.file_name) for e in registry.REGISTRY.values())]
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  for row in rows:
    print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
  print(f"\ncache: {cache}\nurls:  {registry.RESNET_URL}<file>\n       {registry.DENSENET_URL}<file>")


def _convert(args: argparse.Namespace) -> None:
  model = models.BACKBONES[args.arch](include_top=args.include_top, pooling=args.pooling,
                                      num_classes=args.num_classes)
  path = loader.resolve(model, args.keras, cache_dir=args.cache_dir, download_ok=not args.no_download)
  variables = loader.load_keras(model, path)
  metadata = {"arch": args.arch, "include_top": args.include_top, "pooling": args.pooling,
              "num_classes": args.num_classes, "source": str(path.resolve()), "source_md5": download.md5sum(path)}
  out = checkpoint.save_converted(variables, args.out, metadata=metadata, overwrite=args.overwrite)
  print(f"wrote {out} ({args.arch}, include_top={args.include_top}) from {path}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m resdense_jax.weights", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  commands.add_parser("list", help="print the published Keras weight files").set_defaults(run=_list)
  convert = commands.add_parser("convert", help="Keras .h5 weights -> orbax checkpoint of Flax variables")
  convert.add_argument("--keras", required=True, help="Keras .h5/.weights.h5 file, or a published file name")
  convert.add_argument("--arch", required=True, choices=sorted({e.arch for e in registry.REGISTRY.values()}))
  convert.add_argument("--include_top", action="store_true", help="the file has the `predictions` top")
  convert.add_argument("--pooling", choices=["avg", "max"], default=None, help="recorded in metadata.json")
  convert.add_argument("--num_classes", type=int, default=1000)
  convert.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
  convert.add_argument("--overwrite", action="store_true")
  convert.add_argument("--cache_dir", default=None, help="folder to look for / download published files in")
  convert.add_argument("--no_download", action="store_true", help="never download a published file")
  convert.set_defaults(run=_convert)
  args = parser.parse_args(argv)
  try:
    args.run(args)
  except WeightsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
