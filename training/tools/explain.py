"""How faithful the explanations are, and a picture of one: `make explain`, `make explain-eval`.

    python -m training.tools.explain --image serving/samples/7.png   # writes 7.png.explain.png (make explain)
    python -m training.tools.explain --eval                          # deletion test (make explain-eval)

The method itself (Integrated Gradients from a black baseline) is the served core's
(training/core/explain.py). Plain saliency (|∂logit/∂pixel|) is here for the deletion comparison.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from training.core.explain import integrated_gradients
from training.core.tensors import normalize

DELETION_K = (5, 10, 20, 50, 100, 200)


def saliency(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from captum.attr import Saliency

    return Saliency(model).attribute(x.clone().requires_grad_(), target=target, abs=True).detach().reshape(-1, 28, 28)


def delete_top(images: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 (N, 28, 28) images with the first k pixels of each row of `order` (flat indices) set to black."""
    flat = images.reshape(len(images), -1).clone()
    flat.scatter_(1, order[:, :k], 0)
    return flat.reshape(images.shape)


def deletion_curves(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, temperature: float,
                    seed: int = 0) -> dict[str, list[float]]:
    """Mean calibrated true-class probability after blacking out the top-k pixels of each ranking (k = DELETION_K).

    Rankings: IG and saliency (most positive first), random pixels, and random ink pixels (those
    not already black: the random ranking mostly "removes" background that is already gone).
    """
    model.eval()
    x = normalize(images)
    n = len(images)
    generator = torch.Generator().manual_seed(seed)
    rankings = {
        "integrated_gradients": integrated_gradients(model, x, labels).reshape(n, -1).argsort(1, descending=True),
        "saliency": saliency(model, x, labels).reshape(n, -1).argsort(1, descending=True),
        "random": torch.rand(n, 784, generator=generator).argsort(1),
    }
    ink = images.reshape(n, -1) > 0
    rankings["random ink"] = (torch.rand(n, 784, generator=generator) + ink.float()).argsort(1, descending=True)
    curves: dict[str, list[float]] = {}
    with torch.no_grad():
        for name, order in rankings.items():
            curves[name] = []
            for k in (0, *DELETION_K):
                logits = model(normalize(delete_top(images, order, k)))
                p = torch.softmax(logits / temperature, 1).gather(1, labels[:, None]).mean()
                curves[name].append(float(p))
    return curves


def plot_deletion(curves: dict[str, list[float]], n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, values in curves.items():
        ax.plot((0, *DELETION_K), values, "o-", label=name)
    ax.set(xscale="symlog", xlabel="pixels removed (set to black), top-k by each ranking",
           ylabel="mean true-class probability (calibrated)", ylim=(0, 1.02),
           title=f"Deletion test, {n:,} MNIST test digits")
    ax.set_xticks((0, *DELETION_K), [str(k) for k in (0, *DELETION_K)])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_explanation(digit: torch.Tensor, attributions: torch.Tensor, predicted: int, confidence: float,
                     path: Path) -> None:
    """Input, heatmap and overlay side by side; red adds to the predicted digit, blue speaks against it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limit = float(attributions.abs().max()) or 1.0
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    axes[0].imshow(digit, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("input (28×28, as the model sees it)", fontsize=9)
    heat = axes[1].imshow(attributions, cmap="bwr", vmin=-limit, vmax=limit)
    axes[1].set_title("Integrated Gradients", fontsize=9)
    fig.colorbar(heat, ax=axes[1], fraction=0.046)
    axes[2].imshow(digit, cmap="gray", vmin=0, vmax=255)
    axes[2].imshow(attributions, cmap="bwr", vmin=-limit, vmax=limit, alpha=0.6)
    axes[2].set_title("overlay", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"digit {predicted}, confidence {confidence:.2%} (calibrated)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def explain_image(checkpoint: Path, image: Path) -> Path:
    """Preprocess the image as the server does, explain the predicted digit, write `<image>.explain.png`."""
    from training.checkpoint import load_checkpoint, model_from_checkpoint
    from training.core.inputs.preprocess import preprocess_bytes

    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    digit = torch.from_numpy(preprocess_bytes(image.read_bytes()))
    x = normalize(digit)
    with torch.no_grad():
        probabilities = torch.softmax(model(x) / float(ckpt.get("temperature", 1.0)), 1)[0]
    predicted = int(probabilities.argmax())
    attributions = integrated_gradients(model, x, torch.tensor([predicted]))[0]
    out = image.with_name(image.name + ".explain.png")
    plot_explanation(digit, attributions, predicted, float(probabilities[predicted]), out)
    return out


def main(argv: list[str] | None = None) -> int:
    from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
    from training.cli import ArgumentParser
    from training.core.inputs.preprocess import PreprocessError
    from training.data import DataError, load_split

    parser = ArgumentParser(prog="python -m training.tools.explain", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt", type=Path)
    parser.add_argument("--image", type=Path, help="explain this image: writes <image>.explain.png")
    parser.add_argument("--eval", action="store_true", help="deletion test on MNIST test digits")
    parser.add_argument("--count", type=int, default=1000, help="digits in the deletion test (default 1000)")
    parser.add_argument("--data-dir", default=None, help="default: $MNIST_DIR or data/")
    parser.add_argument("--out", default="artifacts/deletion_curves.png", type=Path)
    args = parser.parse_args(argv)
    if not (args.image or args.eval):
        parser.error("pass --image PATH or --eval")
    try:
        if args.image:
            print(f"wrote {explain_image(args.checkpoint, args.image)}")
            return 0
        ckpt = load_checkpoint(args.checkpoint)
        images, labels = load_split(args.data_dir, train=False)
    except (CheckpointError, DataError, PreprocessError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    model = model_from_checkpoint(ckpt)
    curves = deletion_curves(model, images[: args.count], labels[: args.count], float(ckpt.get("temperature", 1.0)))
    print(f"mean true-class probability (calibrated) after removing the top-k pixels, {args.count} test digits")
    print(f"{'ranking':<22}" + "".join(f"{f'k={k}':>8}" for k in (0, *DELETION_K)) + f"{'drop@50':>9}")
    for name, values in curves.items():
        print(f"{name:<22}" + "".join(f"{v:8.4f}" for v in values) + f"{values[0] - values[4]:9.4f}")
    ig, rnd = curves["integrated_gradients"], curves["random"]
    print(f"IG top-50 drop / random-50 drop = {(ig[0] - ig[4]) / max(rnd[0] - rnd[4], 1e-9):.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_deletion(curves, args.count, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
