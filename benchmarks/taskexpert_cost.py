"""What TaskExpert costs over hard sharing on the same ViT: images/s and analytical FLOPs per image, same run.

A measurement script, not a test (pytest does not collect it); it prints two tables.

What is compared (every model on the same tiny ViT: the published scenes grid's backbone by default)
    ``shared_bottom``       hard sharing: the ViT, one dense decoder per task on its last tokens;
    ``mmoe_tokens``         TaskExpert with the memory off (= MMoE on tokens at the same tapped blocks);
    ``taskexpert``          TaskExpert, default options (experts, per-token gates, the memory path).

What is measured
    FLOPs: the analytical multiply-accumulates per image of one forward pass (``mtlbench.vision.nets.count_macs``:
    convs, linear layers, attention products, the experts' batched matmuls and the gate mixing; norms and
    activations not counted), split into backbone (input stage + ViT), experts (shared LayerNorms + expert MLPs),
    gates, mixing, memory writes and decoders. ``flops = 2 * macs``.
    Time: images/s of a training step (forward, the summed task losses, backward, Adam) and of an inference forward
    (eval mode, no grad), on batches of ``--batch`` scenes images, the median over ``--reps`` repetitions of
    ``--steps`` timed steps each, after two warm-up steps; the models take turns in every repetition, so noise on
    a shared machine hits them alike. One thread by default (``--threads``): the least noise-sensitive setting on a
    shared machine, and how the published grid ran.

Ratios printed: each model's FLOPs and time over ``shared_bottom``'s, and the memory path's own overhead
(``taskexpert`` over ``mmoe_tokens``).

How to run (from the repository root)
    .venv/bin/python benchmarks/taskexpert_cost.py             # ~1-2 minutes on one thread
    .venv/bin/python benchmarks/taskexpert_cost.py --quick     # smoke run
    .venv/bin/python benchmarks/taskexpert_cost.py --resolution 32   # the published grid's images
    .venv/bin/python benchmarks/taskexpert_cost.py --device cuda --batch 256
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

VIT = {"encoder": "vit", "depth": 4, "patch": 8, "vit_dim": 64, "vit_heads": 4, "mlp_ratio": 2.0}
MODELS = {"shared_bottom": ("shared_bottom", VIT), "mmoe_tokens": ("taskexpert", {**VIT, "memory": False}),
          "taskexpert": ("taskexpert", VIT)}
PARTS = ("backbone", "experts", "gates", "mix", "memory", "decoders")


def build(name: str, data, device: str):
    from mtlbench import registry
    from mtlbench.registry import build_options

    arch, options = MODELS[name]
    e = registry.get("arch", arch, modality="image")
    torch.manual_seed(0)
    return e.obj(data.schema, data.tasks, 16, build_options(e.options_class, e.resolve_options(options))).to(device)


def macs_by_part(model) -> dict[str, int]:
    """Analytical MACs per image, per part of the model."""
    from mtlbench.vision import nets

    heads = model.heads
    groups = {"backbone": torch.nn.ModuleList([model.shared["input"], model.shared["encoder"]]),
              "experts": torch.nn.ModuleList([m for k, m in model.shared.items() if k in ("norms", "experts")]),
              "gates": torch.nn.ModuleList([heads[t]["gates"] for t in heads if "gates" in heads[t]]),
              "mix": torch.nn.ModuleList([heads[t]["mix"] for t in heads if "mix" in heads[t]]),
              "memory": torch.nn.ModuleList([heads[t]["write"] for t in heads if "write" in heads[t]]),
              "decoders": torch.nn.ModuleList([heads[t]["decoder"] for t in heads])}
    C, H, W = model.image.shape
    T = len(model.tasks)
    dev = next(model.parameters()).device
    batch = {"images": torch.zeros(1, C, H, W, dtype=torch.uint8, device=dev), "labels": torch.zeros(1, T, device=dev),
             "masks": torch.ones(1, T, dtype=torch.bool, device=dev)}
    counts = nets.count_macs(model, lambda: model(batch), groups)
    assert sum(counts.values()) == model.flops()["macs"], "every counted MAC belongs to one part"
    return counts


def step_fn(model, batch, train: bool):
    if train:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            out = model(batch)
            loss = sum(model.task_losses(out.outputs, batch))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def infer():
        with torch.no_grad():
            model(batch)
    return infer


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--resolution", type=int, default=64, help="scenes image size (the published grid: 32)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="2 steps x 2 repetitions")
    a = p.parse_args()
    if a.quick:
        a.steps, a.reps = 2, 2
    torch.set_num_threads(a.threads)
    from mtlbench import registry
    from mtlbench.registry import build_options

    e = registry.get("dataset", "scenes")
    data = e.obj(build_options(e.options_class, e.resolve_options({"resolution": a.resolution}))).load(0)
    split = data.splits["train"]
    batch = {k: v[:a.batch].to(a.device) for k, v in split.tensors.items()}
    models = {n: build(n, data, a.device) for n in MODELS}

    print(f"TaskExpert vs hard sharing on scenes {data.schema.image.height}x{data.schema.image.width}, "
          f"{len(data.tasks)} dense tasks, ViT {VIT}; device {a.device}, {a.threads} thread(s)\n")
    parts = {n: macs_by_part(m) for n, m in models.items()}
    base = sum(parts["shared_bottom"].values())
    print("Analytical FLOPs per image (MFLOPs = 2 x MMACs)")
    print(f"{'model':<14}" + "".join(f"{p:>10}" for p in PARTS) + f"{'total':>10}{'x hard':>9}")
    for n, c in parts.items():
        tot = sum(c.values())
        print(f"{n:<14}" + "".join(f"{2 * c[p] / 1e6:>10.2f}" for p in PARTS) + f"{2 * tot / 1e6:>10.2f}"
              f"{tot / base:>9.3f}")
    te, mo = parts["taskexpert"], parts["mmoe_tokens"]
    moe = te["experts"] + te["gates"] + te["mix"]
    print(f"experts + gates + mixing over the backbone: {moe / te['backbone']:.3f}; gates + mixing alone: "
          f"{(te['gates'] + te['mix']) / te['backbone']:.4f}; memory path (taskexpert - mmoe_tokens) over "
          f"mmoe_tokens: {(sum(te.values()) - sum(mo.values())) / sum(mo.values()):+.4f}\n")

    times: dict[tuple[str, str], list[float]] = {}
    for mode in ("train", "infer"):
        steps = {}
        for n, m in models.items():
            m.train(mode == "train")
            steps[n] = step_fn(m, batch, mode == "train")
            for _ in range(2):
                steps[n]()
        for _ in range(a.reps):
            for n in models:
                sync(a.device)
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    steps[n]()
                sync(a.device)
                times.setdefault((n, mode), []).append(a.batch * a.steps / (time.perf_counter() - t0))
    print(f"Images/s (median of {a.reps} x {a.steps} steps of batch {a.batch}); ratio = time per image over "
          f"shared_bottom's")
    print(f"{'model':<14}{'train img/s':>13}{'x time':>9}{'infer img/s':>13}{'x time':>9}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for n in models:
        print(f"{n:<14}{med[(n, 'train')]:>13.1f}{med[('shared_bottom', 'train')] / med[(n, 'train')]:>9.3f}"
              f"{med[(n, 'infer')]:>13.1f}{med[('shared_bottom', 'infer')] / med[(n, 'infer')]:>9.3f}")
    print(f"memory path's time overhead (taskexpert over mmoe_tokens): train "
          f"{med[('mmoe_tokens', 'train')] / med[('taskexpert', 'train')] - 1:+.3f}, infer "
          f"{med[('mmoe_tokens', 'infer')] / med[('taskexpert', 'infer')] - 1:+.3f}")
    print(f"load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
