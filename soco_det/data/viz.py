"""A grid of SoCo views (``soco-det viz views``) with their boxes, the picture to check before training.

One row per sample, labelled with its image file; per pair (1, v) two panels: V1 with the pair's boxes and Vv with its boxes
(de-normalised, after flips, colour and cutout). Boxes are coloured by proposal id (the same colour
in both views of a pair) and labelled ``P<level+2>#<id>``.
"""

from __future__ import annotations

from soco_det.atomic import atomic_open
from soco_det.data.photometric import denormalise


def row_label(dataset, index: int, used: int, width: int = 40) -> str:
    """The image a row shows: its path relative to the images root (the start cut to ``width``
    characters), and the sample it stands in for when a bad image was replaced."""
    key = dataset.items[used].key
    if len(key) > width:
        key = "..." + key[-(width - 3) :]
    return key if used == index else f"{key} (for bad #{index})"


def render_views(dataset, out_png: str, samples: int = 4, epoch: int = 0) -> str:
    """Draw ``samples`` samples (indices spread over the dataset) to ``out_png``; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cfg = dataset.sampler.cfg
    indices = sorted({int(i * len(dataset) / samples) for i in range(samples)})
    npairs = len(dataset.sampler.pairs)
    fig, axes = plt.subplots(len(indices), 2 * npairs, figsize=(2.6 * 2 * npairs, 3.3 * len(indices)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for row, index in enumerate(indices):
        sample, used, _ = dataset.views(index, epoch)
        for p, pair in enumerate(sample.pairs):
            for side, view in enumerate(pair):
                ax = axes[row][2 * p + side]
                size = cfg.geometry.view_sizes[view]
                ax.imshow(
                    denormalise(sample.images[view], cfg.photometric.mean, cfg.photometric.std),
                    extent=(0, size, size, 0),
                )
                for box, pid, level in zip(sample.boxes[p][side], sample.ids[p][side], sample.levels[p][side]):
                    x1, y1, x2, y2 = (float(c) * size for c in box)
                    color = cmap(int(pid) % 20)
                    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.6, ec=color))
                    tag = f"P{int(level) + 2}" if level >= 0 else "P-"
                    ax.text(
                        x1 + 1,
                        y1 + 1,
                        f"{tag}#{int(pid)}",
                        color="white",
                        fontsize=6,
                        va="top",
                        bbox=dict(facecolor=color, alpha=0.8, pad=0.5, lw=0),
                    )
                flip = " flip" if sample.flips[view] else ""
                title = f"V{view + 1} {size}px{flip} (pair {pair[0] + 1}-{pair[1] + 1})"
                if p == 0 and side == 0:  # the row's first panel names the image
                    title = f"{row_label(dataset, index, used)}\n{title}"
                ax.set_title(title, fontsize=7)
                ax.set_axis_off()
    fig.suptitle(
        f"views recipe {cfg.recipe}{' (legacy)' if cfg.legacy else ''}: boxes coloured by proposal id, "
        "labelled level#id",
        fontsize=9,
    )
    fig.tight_layout()
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return out_png
