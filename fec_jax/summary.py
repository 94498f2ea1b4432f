"""Parameters and multiply-accumulates of FEC variants, next to the paper's Table 1.

  python -m fec_jax.summary fec_small [fec_base ...] [--size 224]

MACs come from XLA's cost analysis of the compiled forward pass (flops / 2), so they count every
operation of the clustering layers too, not only convolutions and matmuls. The stages' blocks are
unrolled for it (`unroll_stages`): the cost analysis counts a loop body once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fec_jax import cli, reporting, throughput
from fec_jax.model import count_params, create_model, list_models, variable_shapes

PAPER_TABLE_1 = {"fec_small": (5.5, 1.4), "fec_base": (14.4, 3.4), "fec_large": (28.3, 6.5)}  # M, G


def macs_per_image(name: str, height: int = 224, width: int = 224, variables=None) -> float:
  """Multiply-accumulates of `name`'s forward pass on one height x width image: XLA's flops / 2
  (see the module's docstring). `variables`: the model's variable_shapes (None: made here; every
  collection, fpn_* have batch_stats too)."""
  model = create_model(name, unroll_stages=True)  # cost analysis counts a loop body once
  variables = variable_shapes(create_model(name)) if variables is None else variables
  images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  cost = throughput.cost_analysis(jax.jit(model.apply).lower(variables, images).compile())
  return float(cost["flops"]) / 2


def main(argv: list[str] | None = None) -> None:
  parser = cli.ArgumentParser(
      prog="python -m fec_jax.summary", description=__doc__, formatter_class=cli.HelpFormatter
  )
  parser.add_argument(
      "models",
      nargs="*",
      metavar="MODEL",
      help=f"default: {' '.join(PAPER_TABLE_1)}; any of {', '.join(list_models())}",
  )
  parser.add_argument("--size", type=int, nargs="+", default=[224], help="H [W] of the input")
  args = parser.parse_args(argv)
  unknown = sorted(set(args.models) - set(list_models()))
  if unknown:
    cli.fail(
        f"unknown model {', '.join(unknown)}; the models are: {', '.join(list_models())}"
        + reporting.did_you_mean(unknown, list_models())
    )
  if len(args.size) > 2 or min(args.size) < 1:
    cli.fail(f"--size takes H or H W (positive), got {' '.join(map(str, args.size))}")
  height, width = (args.size * 2)[:2]
  for name in args.models or PAPER_TABLE_1:
    cli.check_input_size(create_model(name), (height, width), "--size")
  print(f"{'model':<16}{'params':>14}{'= M (2^20)':>12}{'GMACs':>9}  paper: params M, GFLOPs")
  for name in args.models or PAPER_TABLE_1:
    variables = variable_shapes(create_model(name))
    params = count_params(variables["params"])
    macs = macs_per_image(name, height, width, variables)
    paper = PAPER_TABLE_1.get(name)
    paper = f"{paper[0]:.1f}, {paper[1]:.1f}" if paper and (height, width) == (224, 224) else "-"
    print(f"{name:<16}{params:>14,}{params / 2**20:>12.2f}{macs / 1e9:>9.2f}  {paper}")


if __name__ == "__main__":
  with cli.interruptible():
    main()
