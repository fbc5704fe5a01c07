"""The lazy-layer analysis of Inheritune (Sanyal et al., arXiv 2404.08634, Figure 1): how degenerate each layer's
attention is, measured on validation text.

    python inheritune/attention_rank.py --checkpoint_dir out/ref/final --data_dir data/demo --num_sequences 32 \
        --seq_len 256 --out_dir out/ref/rank

The sequences are the first `num_sequences` blocks of `seq_len` tokens of the validation shards (`validation*`, in
file order, no shuffle) of `data_dir`, or of `data_dir/validation` (the demo corpus's layout). For every layer and
head, the post-softmax causal attention matrix (T x T, computed in fp32, or fp64 for a float64 model) is averaged
over those sequences; on that average A:
- the approximate rank k* is the smallest r with s_1^2 + ... + s_r^2 >= threshold * (s_1^2 + ... + s_T^2), where
  s_1 >= s_2 >= ... are the singular values of A (threshold 0.9 by default);
- the mass m* is the fewest columns of A holding `threshold` of its mass: the smallest m such that the m largest
  column sums add up to >= threshold * T (every row of A sums to 1, so the whole mass is T).

k* at threshold 0.9 is the paper's approximate rank (its Section 2 and Figure 1: "attention matrices collapse to
near rank-one" in the deeper layers); m* is its single-column measure, shown beside k*.

Lazy rule (the paper's): a layer is lazy when every one of its heads has k* <= lazy_rank (default 1: the rank-1
degeneration the paper calls lazy; at 2, a head that mixes two patterns, a sink and the previous token, would count
too), measured at `threshold` on the head's attention averaged over the sequences. With lazy_mass, also m* <=
lazy_mass: the stricter single-column rule. A head that puts half of every row on the first token and spreads the
rest over its prefix has k* = 1 at 0.9 and a large m*: lazy by the paper's rule, not by the mass rule. (Under a causal
mask an exactly rank-1 row-stochastic matrix is the single column; a spread head is rank-1 only at the threshold.)

Writes `attention_rank.json` (the settings, and per layer: k* and m* of each head, their max, mean and min over heads,
and whether the layer is lazy), `attention_rank.png` (k* vs layer) and `attention_mass.png` (m* vs layer), each with
the max, the mean and the min-max band over heads, and `attention_layer{L}.png`, the heads' average attention, for
each layer L of `--plot_layers`. The attention is computed here from each block's own q and k (its norm_1, then
attn.qkv, RoPE, grouped K expanded to the heads), running the model's blocks in order for each layer's input;
the training path of model.py is unchanged. Memory: the averages of every layer (n_layer x n_head x T x T) plus one
layer's attention for one batch (batch_size x n_head x T x T); lower --batch_size for long sequences.
"""

import itertools
import math
import sys
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import load_config, load_model
from model import GPT, Block, apply_rope
from packed_dataset import PackedDataset, data_files
from utils import UserError, atomic_write, cli, write_json

LAZY_RULE = ("a layer is lazy when every one of its heads has approximate rank k* <= lazy_rank (and, with lazy_mass, "
             "mass m* <= lazy_mass), measured at `threshold` on the head's attention averaged over the sequences")
# A share within this of the threshold counts as reaching it: the identity of size 10 holds exactly 9/10 of its
# energy in 9 directions, and the rounding of the SVD must not turn that into 10.
TIE_TOLERANCE = 1e-9


def attention_rank(checkpoint_dir: Path, data_dir: Path, num_sequences: int = 32, seq_len: int = 256,
                   out_dir: Optional[Path] = None, threshold: float = 0.9, lazy_rank: int = 1,
                   lazy_mass: Optional[int] = None,
                   plot_layers: Sequence[int] = (), device: Literal["auto", "cpu", "cuda"] = "auto",
                   batch_size: int = 8) -> dict:
    """Measure the approximate rank and the mass of every head's average attention, layer by layer, and find the lazy
    layers; write attention_rank.json and the plots. Returns the JSON's content.

    Args:
        checkpoint_dir: the checkpoint directory to analyse (lit_model.pth, model_config.json)
        data_dir: the directory of the validation shards (validation*), or the parent of a validation/ directory
            holding them
        num_sequences: how many blocks of seq_len tokens to average over (the first ones, in file order)
        seq_len: tokens per sequence (T); at most the model's block_size
        out_dir: where the JSON and the PNGs are written; none: checkpoint_dir
        threshold: the share of the energy (squared singular values) for k*, and of the mass for m*
        lazy_rank: a layer is lazy when every head has k* <= lazy_rank (1: the paper's rank-1 degeneration)
        lazy_mass: ... and, if given, m* <= lazy_mass (the stricter single-column rule); none: m* is only reported
        plot_layers: the layers (0-based) whose heads' average attention is drawn as heat maps
        device: where the model runs; auto: cuda when available, else cpu
        batch_size: sequences per forward pass
    """
    check_arguments(num_sequences, seq_len, threshold, lazy_rank, lazy_mass, batch_size)
    plt = import_pyplot()  # before the work: a missing matplotlib should not cost the forward passes
    checkpoint_dir, data_dir = Path(checkpoint_dir), Path(data_dir)
    out_dir = checkpoint_dir if out_dir is None else Path(out_dir)
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device; use --device cpu (or auto)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = load_config(checkpoint_dir)  # the model is loaded once the flags and the data are checked
    if seq_len > config.block_size:
        raise UserError(f"--seq_len {seq_len} exceeds the block_size {config.block_size} of {checkpoint_dir}: "
                        f"choose --seq_len <= {config.block_size}")
    bad_layers = [layer for layer in plot_layers if not 0 <= layer < config.n_layer]
    if bad_layers:
        raise UserError(f"--plot_layers {bad_layers}: {checkpoint_dir} has {config.n_layer} layers, "
                        f"numbered 0 to {config.n_layer - 1}")
    sequences = validation_sequences(data_dir, num_sequences, seq_len)
    check_vocabulary(sequences, config.vocab_size, data_dir, checkpoint_dir)
    model = load_model(checkpoint_dir, device=device, dtype=torch.float32)

    attention = mean_attention(model, sequences, batch_size).cpu()
    layers = [layer_summary(heads, threshold, lazy_rank, lazy_mass) for heads in attention]
    report = {
        "checkpoint_dir": str(checkpoint_dir),
        "model": config.name,
        "data_dir": str(data_dir),
        "num_sequences": num_sequences,
        "seq_len": seq_len,
        "threshold": threshold,
        "lazy_rank": lazy_rank,
        "lazy_mass": lazy_mass,
        "lazy_rule": LAZY_RULE,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "lazy_layers": [i for i, layer in enumerate(layers) if layer["lazy"]],
        "layers": [{"layer": i, **layer} for i, layer in enumerate(layers)],
        "plots": ["attention_rank.png", "attention_mass.png"] + [f"attention_layer{n}.png" for n in plot_layers],
    }
    title = f"{config.name or checkpoint_dir.name}: {num_sequences} sequences of {seq_len} tokens"
    plot_over_layers(plt, report, "rank", lazy_rank, f"approximate rank k* ({threshold:.0%} of the energy)", title,
                     out_dir / "attention_rank.png")
    plot_over_layers(plt, report, "mass", lazy_mass, f"columns holding {threshold:.0%} of the mass, m*", title,
                     out_dir / "attention_mass.png")
    for layer in plot_layers:
        plot_heads(plt, attention[layer], report["layers"][layer], f"{title}, layer {layer}",
                   out_dir / f"attention_layer{layer}.png")
    write_json(out_dir / "attention_rank.json", report)
    print_table(report)
    print(f"Wrote {out_dir / 'attention_rank.json'} and the plots beside it")
    return report


def check_arguments(num_sequences: int, seq_len: int, threshold: float, lazy_rank: int, lazy_mass: Optional[int],
                    batch_size: int) -> None:
    for name, value in (("num_sequences", num_sequences), ("seq_len", seq_len), ("lazy_rank", lazy_rank),
                        ("lazy_mass", lazy_mass), ("batch_size", batch_size)):
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if not 0 < threshold <= 1:
        raise UserError(f"--threshold must be in (0, 1], got {threshold}: it is a share of the energy and the mass")


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("attention_rank.py draws its plots with matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no window: runs headless
    import matplotlib.pyplot as plt

    return plt


def validation_sequences(data_dir: Path, num_sequences: int, seq_len: int) -> torch.Tensor:
    """(num_sequences, seq_len) int64: the first blocks of the validation* shards of data_dir, in file order; the
    shards may also be in data_dir/validation, the layout prepare_data/prepare_demo.py writes."""
    data_dir = Path(data_dir)
    if not any(path.is_file() for path in data_dir.glob("validation*")) and (data_dir / "validation").is_dir():
        data_dir = data_dir / "validation"
    dataset = PackedDataset(data_files(data_dir, "validation", "--data_dir"), n_chunks=1, block_size=seq_len,
                            shuffle=False)
    if dataset.n_blocks_total < num_sequences:
        raise UserError(f"--num_sequences {num_sequences}: the validation shards in {data_dir} hold only "
                        f"{dataset.n_blocks_total} blocks of {seq_len} tokens; lower --num_sequences or --seq_len")
    return torch.stack(list(itertools.islice(dataset, num_sequences)))


def check_vocabulary(sequences: torch.Tensor, vocab_size: int, data_dir: Path, checkpoint_dir: Path) -> None:
    low, high = int(sequences.min()), int(sequences.max())
    if low < 0 or high >= vocab_size:
        raise UserError(f"The validation shards of {data_dir} hold token id {low if low < 0 else high}, outside the "
                        f"vocabulary [0, {vocab_size - 1}] of {checkpoint_dir}: tokenize the data with the "
                        f"checkpoint's own tokenizer")


@torch.inference_mode()
def mean_attention(model: GPT, sequences: torch.Tensor, batch_size: int) -> torch.Tensor:
    """sequences: (N, T) token ids. Returns (n_layer, n_head, T, T), every head's attention averaged over the N
    sequences, on the model's device; batch_size sequences per forward, one layer's attention held at a time."""
    device = model.transformer.wte.weight.device
    total = None
    for batch in sequences.split(batch_size):
        for layer, attention in enumerate(layer_attentions(model, batch.to(device))):
            if total is None:
                total = attention.new_zeros((model.config.n_layer, *attention.shape[1:]))
            total[layer] += attention.sum(0)
    return total / len(sequences)


@torch.inference_mode()
def attention_matrices(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """idx: (B, T) token ids. Returns (n_layer, n_head, T, T): each head's post-softmax attention averaged over the B
    rows (fp32, or the model's dtype where wider). For many sequences, `mean_attention` batches them."""
    return torch.stack([attention.mean(0) for attention in layer_attentions(model, idx)])


@torch.inference_mode()
def layer_attentions(model: GPT, idx: torch.Tensor) -> Iterator[torch.Tensor]:
    """idx: (B, T) token ids. Yields, for each layer in order, its post-softmax attention (B, n_head, T, T) with the
    causal mask, as the model's own forward computes it: each block's input is the previous blocks' output."""
    T = idx.size(1)
    if T > model.config.block_size:
        raise ValueError(f"Sequence length {T} exceeds block_size={model.config.block_size}")
    cos, sin = model.cos[:T], model.sin[:T]
    x = model.transformer.wte(idx)
    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        yield block_attention(block, x, cos, sin)
        if i + 1 < len(blocks):  # the last block's output is not needed
            x = block(x, cos, sin)


def block_attention(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, n_embd), the block's input; cos, sin: (T, head_size). Returns (B, n_head, T, T), the softmax of
    q k^T / sqrt(head_size) under the causal mask, from the block's own norm_1, qkv and RoPE."""
    cfg = block.attn.config
    B, T, _ = x.shape
    hs = cfg.head_size
    q, k, _ = block.attn.qkv(block.norm_1(x)).split(
        (cfg.n_head * hs, cfg.n_query_groups * hs, cfg.n_query_groups * hs), dim=-1
    )
    q = apply_rope(q.view(B, T, cfg.n_head, hs), cos, sin)
    k = apply_rope(k.view(B, T, cfg.n_query_groups, hs), cos, sin)
    # head h reads K group h // (n_head / n_query_groups), as SDPA's enable_gqa and HF's repeat_kv do
    k = k.repeat_interleave(cfg.n_head // cfg.n_query_groups, dim=2)
    # softmax in fp32 at least: a bf16 probability keeps about 3 significant digits
    dtype = torch.promote_types(x.dtype, torch.float32)
    scores = (q.transpose(1, 2).to(dtype) @ k.permute(0, 2, 3, 1).to(dtype)) * (1.0 / math.sqrt(hs))
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def approximate_rank(matrix: torch.Tensor, threshold: float = 0.9) -> int:
    """k*: the fewest singular directions of matrix (2-D) holding `threshold` of its energy, the smallest r with
    s_1^2 + ... + s_r^2 >= threshold * sum(s^2), singular values in descending order (computed in float64)."""
    return smallest_share(torch.linalg.svdvals(check_matrix(matrix)).square(), threshold)


def mass_columns(matrix: torch.Tensor, threshold: float = 0.9) -> int:
    """m*: the fewest columns of matrix (2-D, non-negative) holding `threshold` of its mass, the smallest m whose m
    largest column sums add up to >= threshold * the total (T for an attention matrix, whose rows sum to 1)."""
    return smallest_share(check_matrix(matrix).sum(0).sort(descending=True).values, threshold)


def check_matrix(matrix: torch.Tensor) -> torch.Tensor:
    if matrix.dim() != 2 or not matrix.abs().sum() > 0:
        raise ValueError(f"Expected a non-zero 2-D matrix, got shape {tuple(matrix.shape)} with sum of absolute values "
                         f"{float(matrix.abs().sum())}")
    return matrix.double()


def smallest_share(values: torch.Tensor, threshold: float) -> int:
    """The fewest leading entries of `values` (non-negative, descending) whose sum reaches `threshold` of the total."""
    shares = values.cumsum(0) / values.sum()
    return int((shares < threshold - TIE_TOLERANCE).sum()) + 1


def layer_summary(heads: torch.Tensor, threshold: float, lazy_rank: int, lazy_mass: Optional[int] = None) -> dict:
    """heads: (n_head, T, T), one layer's average attention. Returns k* and m* of each head, their max, mean and
    min over heads, and whether the layer is lazy (`LAZY_RULE`)."""
    ranks = [approximate_rank(head, threshold) for head in heads]
    masses = [mass_columns(head, threshold) for head in heads]
    summary = {}
    for key, values in (("rank", ranks), ("mass", masses)):
        summary.update({key: values, f"max_{key}": max(values), f"mean_{key}": sum(values) / len(values),
                        f"min_{key}": min(values)})
    summary["lazy"] = max(ranks) <= lazy_rank and (lazy_mass is None or max(masses) <= lazy_mass)
    return summary


def plot_over_layers(plt, report: dict, key: str, lazy_limit: Optional[int], ylabel: str, title: str,
                     path: Path) -> None:
    """One panel of the paper's Figure 1: the max, the mean and the min-max band over heads of k* or m* ("rank" or
    "mass"), per layer; the lazy limit (if any) as a line, the lazy layers shaded."""
    from matplotlib.ticker import FormatStrFormatter  # matplotlib is imported lazily: an optional dependency

    layers = report["layers"]
    x = [layer["layer"] for layer in layers]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(x, [layer[f"min_{key}"] for layer in layers], [layer[f"max_{key}"] for layer in layers],
                    alpha=0.2, color="C0", label="min-max over heads")
    ax.plot(x, [layer[f"max_{key}"] for layer in layers], "o-", color="C0", label="max over heads")
    ax.plot(x, [layer[f"mean_{key}"] for layer in layers], "s--", color="C1", label="mean over heads")
    if lazy_limit is not None:
        ax.axhline(lazy_limit, color="C3", linestyle=":", label=f"lazy limit ({lazy_limit})")
    for layer in report["lazy_layers"]:
        ax.axvspan(layer - 0.5, layer + 0.5, color="C3", alpha=0.1, linewidth=0)
    # log scale: 1 and 2 (lazy) must stay apart from each other and from T
    ax.set_yscale("log", base=2)
    ax.set_ylim(0.8, report["seq_len"] * 1.25)
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_xticks(x[::math.ceil(len(x) / 24)])  # at most 24 labels: at 30+ layers they would run together
    ax.set_xlabel("layer" + (" (shaded: lazy)" if report["lazy_layers"] else ""))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes, never over the data
    save_figure(plt, fig, path)


def plot_heads(plt, heads: torch.Tensor, summary: dict, title: str, path: Path) -> None:
    """Heat maps of one layer's average attention (n_head, T, T), one panel per head with its k* and m*."""
    from matplotlib.colors import PowerNorm

    n_head = heads.size(0)
    columns = min(n_head, 8)
    rows = math.ceil(n_head / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows + 0.4), squeeze=False)
    for h, ax in enumerate(axes.flat):
        ax.axis("off")
        if h < n_head:
            # square-root colour scale: the diagonal and the first column would otherwise hide the rest
            ax.imshow(heads[h].float().numpy(), cmap="viridis",
                      norm=PowerNorm(0.5, vmin=0, vmax=float(heads[h].max())))
            ax.set_title(f"head {h}: k*={summary['rank'][h]}, m*={summary['mass'][h]}", fontsize=8)
    fig.suptitle(f"{title}{' (lazy)' if summary['lazy'] else ''}: query (rows) x key (columns)", fontsize=10)
    save_figure(plt, fig, path)


def save_figure(plt, fig, path: Path) -> None:
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def print_table(report: dict) -> None:
    print(f"{'layer':>5} {'max k*':>7} {'mean k*':>8} {'max m*':>7} {'mean m*':>8}  lazy")
    for layer in report["layers"]:
        print(f"{layer['layer']:>5} {layer['max_rank']:>7} {layer['mean_rank']:>8.1f} {layer['max_mass']:>7} "
              f"{layer['mean_mass']:>8.1f}  {'yes' if layer['lazy'] else ''}")
    mass = "" if report["lazy_mass"] is None else f", lazy_mass={report['lazy_mass']}"
    print(f"Lazy layers ({LAZY_RULE}, lazy_rank={report['lazy_rank']}{mass}, threshold={report['threshold']}): "
          f"{report['lazy_layers'] or 'none'}")


if __name__ == "__main__":
    cli(attention_rank)
