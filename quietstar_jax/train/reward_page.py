"""A self-contained HTML page showing which thoughts helped.

Each token of a text is a span coloured by the reward of the thought sampled
right after it (green: the thought made the next tokens more likely than the
base model did; red: less likely); hovering shows that thought and its reward.
Inline CSS only: the file opens anywhere, offline.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; }
.text { font-family: ui-monospace, monospace; line-height: 2.1; white-space: pre-wrap;
        border: 1px solid #ccc; padding: 1em; margin-bottom: 1.5em; }
.t { position: relative; border-radius: 3px; padding: 1px 0; }
.t:hover { outline: 1px solid #333; }
.t[data-thought]:hover::after { content: attr(data-thought); position: absolute; left: 0;
        top: 1.9em; z-index: 10; white-space: pre; background: #222; color: #fff;
        padding: 4px 8px; border-radius: 4px; font-size: 0.85em; }
.legend span { padding: 2px 8px; margin-right: 4px; border-radius: 3px; }
"""


def reward_colour(r: float, scale: float) -> str:
    """Background colour of reward `r`: green for positive, red for negative, white at
    0; full intensity at `|r| >= scale`."""
    a = 0.0 if scale <= 0 or not np.isfinite(r) else min(abs(r) / scale, 1.0)
    if r >= 0:
        return f"rgba(0, 160, 60, {a:.3f})"
    return f"rgba(210, 30, 30, {a:.3f})"


def _visible(text: str) -> str:
    return text.replace("\n", "\u21b5\n")


def render_example(pieces: Sequence[str], rewards: Sequence[float],
                   thoughts: Sequence[str | None], scale: float) -> str:
    """One text as HTML spans. pieces: the text of each token `[seq]`; rewards: the
    reward of the thought after token i (NaN where none); thoughts: its decoded text
    (None where none)."""
    spans = []
    for i, piece in enumerate(pieces):
        r = float(rewards[i]) if i < len(rewards) else float("nan")
        thought = thoughts[i] if i < len(thoughts) else None
        style = "" if not np.isfinite(r) else f' style="background:{reward_colour(r, scale)}"'
        tip = ""
        if thought is not None and np.isfinite(r):
            tip = f' data-thought="{html.escape(f"thought: {thought!r}   reward {r:+.3f}")}"'
        spans.append(f'<span class="t"{style}{tip}>{html.escape(_visible(piece))}</span>')
    return '<div class="text">' + "".join(spans) + "</div>"


def render_page(
    title: str,
    examples: Sequence[tuple[Sequence[str], Sequence[float], Sequence[str | None]]],
    note: str = "",
) -> str:
    """The whole page: `examples` is a list of (pieces, rewards, thoughts) as in
    `render_example`; colours share one scale (the largest |reward| shown)."""
    finite = [abs(float(r)) for _, rs, _ in examples for r in rs if np.isfinite(r)]
    scale = max(finite) if finite else 1.0
    body = "\n".join(render_example(p, r, t, scale) for p, r, t in examples)
    legend = (
        '<p class="legend">Each token is coloured by the reward of the thought sampled '
        "right after it (the base model's loss on the next tokens minus the loss with the "
        "thought). Hover a token to see its thought. "
        f'<span style="background:{reward_colour(-scale, scale)}">{-scale:+.3f}</span>'
        f'<span style="background:{reward_colour(0.0, scale)}">0</span>'
        f'<span style="background:{reward_colour(scale, scale)}">{scale:+.3f}</span></p>'
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h2>{html.escape(title)}</h2>{legend}"
        f"<p>{html.escape(note)}</p>{body}</body></html>\n"
    )


def write_page(path: str, page: str) -> None:
    """Write `page` to `path` via a temporary file and a rename."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    import os

    os.replace(tmp, path)
