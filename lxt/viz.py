"""Heatmaps: terminal colours, HTML and PNG, red (positive) / blue (negative) on a symmetric
scale.  The tokens of a user's chat message (``Explanation.in_user_message``) are underlined
(terminal, HTML) or boxed (PNG); the rest of the rendered chat template is shown plain.
``sink="separate"`` draws the first token apart (an attention sink often holds much of the
relevance; :data:`SINK_NOTE` says what it means) and colours the others on their own scale."""
from __future__ import annotations

import html
from typing import Sequence


def _scale(relevance) -> float:
    m = float(relevance.abs().max()) if relevance.numel() else 0.0
    return m if m > 0 else 1.0


#: ``sink=`` of the text views: ``"inline"`` (the default) draws the first token like any other,
#: on the scale of all tokens; ``"separate"`` draws it apart (boxed, its share of the total
#: |relevance| written out) and scales the colours of the other tokens by them alone
SINKS = ("inline", "separate")

#: the caption of ``sink="separate"``: what the first token's relevance means
SINK_NOTE = ("The first token is drawn apart, boxed, with its share of the total |relevance|; the "
             "colours of the other tokens are scaled by them alone, so their contrast shows. Its "
             "relevance is real: models park attention on the first token (an attention sink), "
             "and the value path through it carries relevance to the prediction, which does "
             "depend on it. It is part of the explanation, and the sum still includes it.")


def _separate(exp, sink) -> bool:
    """Whether ``sink`` asks for the first token drawn apart (checked; text views only)."""
    if sink not in SINKS:
        raise ValueError(f"lxt: sink must be one of {', '.join(map(repr, SINKS))}, got {sink!r}.")
    if sink == "separate" and exp.tokens is None:
        raise ValueError("lxt: sink='separate' is for text explanations (an image has no first token).")
    return sink == "separate"


def sink_label(exp) -> str:
    """``first token 41% of |R|``: the label of the first token in ``sink="separate"``."""
    return f"first token {exp.first_token_share:.0%} of |R|"


def _positional_rows(exp) -> list:
    """``[(label, values)]``: the rows of positional relevance an explanation has
    (``explain(..., positional=True)``: per position, beside the tokens), else ``[]``."""
    rows = []
    for label, name in (("positions", "position_relevance"), ("token types", "token_type_relevance")):
        values = getattr(exp, name, None)
        if values is not None and exp.tokens is not None and len(values) == len(exp.tokens):
            rows.append((label, values))
    return rows


def _joint_scale(exp, separate: bool) -> float:
    """The colour scale of tokens and positional rows together (one scale: comparable);
    ``separate``: without the first token and position 0 (``sink="separate"``)."""
    start = 1 if separate else 0
    scale = _scale(exp.relevance[start:])
    for _, values in _positional_rows(exp):
        scale = max(scale, _scale(values[start:]))
    return scale


def colour(value: float, scale: float) -> tuple:
    """``(r, g, b)`` in 0..255: white at 0, red for positive, blue for negative."""
    a = max(-1.0, min(1.0, value / scale))
    fade = int(round(255 * (1 - abs(a))))
    return (255, fade, fade) if a >= 0 else (fade, fade, 255)


#: matplotlib text drawn as it is, whatever a token or a label holds: no mathtext (``$x$``,
#: ``$$``); LaTeX (``text.usetex``) is off for the whole figure (:func:`png`)
_LITERAL = {"parse_math": False}


def _show_token(tok: str) -> str:
    """A token as it is shown: newlines, tabs and other control characters (a carriage return,
    a terminal escape) written as escapes, so they neither break the layout nor act."""
    return "".join(c.encode("unicode_escape").decode("ascii") if ord(c) < 32 or 127 <= ord(c) < 160
                   else c for c in tok)


def _user(exp) -> list:
    """Per token, whether it is in a user's chat message (all ``False`` for other inputs)."""
    marks = getattr(exp, "in_user_message", None)
    return list(marks) if marks is not None else [False] * len(exp.tokens)


def terminal(exp, sink: str = "inline") -> str:
    """The tokens on 24-bit ANSI backgrounds (a user's chat message underlined), then the
    target line; ``sink="separate"``: the first token in brackets with its share, the others
    coloured on their own scale, and :data:`SINK_NOTE`."""
    separate = _separate(exp, sink)
    s = _joint_scale(exp, separate)
    parts = []
    for tok, r, user in zip(exp.tokens, exp.relevance.tolist(), _user(exp)):
        red, green, blue = colour(r, s)
        under = "\x1b[4m" if user else ""
        parts.append(f"\x1b[48;2;{red};{green};{blue}m\x1b[38;2;0;0;0m{under}{_show_token(tok)}\x1b[0m")
    extra = ""
    for label, values in _positional_rows(exp):  # positional relevance, one cell per position
        cells = "".join("\x1b[48;2;{};{};{}m\x1b[38;2;0;0;0m {} \x1b[0m".format(*colour(v, s), i)
                        for i, v in enumerate(values.tolist()))
        extra += f"\n{label} ({float(values.sum()):+.3f}): {cells}"
    if separate and parts:
        parts[0] = f"[{parts[0]}] ({sink_label(exp)}) "
    head = f"{exp.method}: explaining {exp.target!r}"
    if exp.contrast is not None:
        head += f" vs {exp.contrast!r}"
    head += f" (value {exp.logit:+.3f})"
    if any(_user(exp)):
        head += "; the user's message underlined"
    top = ", ".join(f"{t!r} {v:+.3f}" for t, v in exp.top(3))
    note = f"\n{SINK_NOTE}" if separate else ""
    return f"{head}\n{''.join(parts)}{extra}\nmost relevant: {top}{note}"


def html_fragment(exp, sink: str = "inline") -> str:
    """A ``<div>`` with one ``<span>`` per token; ``data-relevance`` holds the value; the tokens
    of a user's chat message have the class ``user`` (underlined and bold).  ``sink="separate"``:
    the first token's span inside a boxed ``<span class="sink">`` with its share
    (``<span class="sink-share">``), the other tokens coloured on their own scale, and
    :data:`SINK_NOTE` as a ``<div class="sink-note">``."""
    separate = _separate(exp, sink)
    s = _joint_scale(exp, separate)
    spans = []
    for tok, r, user in zip(exp.tokens, exp.relevance.tolist(), _user(exp)):
        red, green, blue = colour(r, s)
        cls, mark = ("tok user", "; text-decoration: underline; font-weight: bold") if user else ("tok", "")
        spans.append(
            f'<span class="{cls}" data-relevance="{r:.6g}" title="{r:+.4f}" '
            f'style="background-color: rgb({red}, {green}, {blue}){mark}">{html.escape(_show_token(tok))}</span>'
        )
    note = ""
    if separate and spans:
        spans[0] = (f'<span class="sink" style="border: 2px solid #222; border-radius: 3px; padding: 1px 3px; '
                    f'margin-right: .5em">{spans[0]} <span class="sink-share">{html.escape(sink_label(exp))}'
                    '</span></span>')
        note = f'<div class="sink-note" style="color:#555;font-size:small">{html.escape(SINK_NOTE)}</div>'
    target = html.escape(repr(exp.target))
    contrast = f" vs {html.escape(repr(exp.contrast))}" if exp.contrast is not None else ""
    legend = "; the user's message underlined" if any(_user(exp)) else ""
    picture = ""
    if getattr(exp, "image_relevance", None) is not None:  # the image heatmap beside the prompt
        import base64

        data = base64.b64encode(image_png_bytes(exp)).decode("ascii")
        picture = (f'<img class="image-relevance" alt="image relevance" style="float:left;margin-right:1em" '
                   f'src="data:image/png;base64,{data}">')
    positional = ""
    for label, values in _positional_rows(exp):  # a second row: relevance per position
        cells = "".join(
            f'<span class="pos" data-relevance="{v:.6g}" title="{label} {i}: {v:+.4f}" '
            'style="background-color: rgb({}, {}, {})">{}</span>'.format(*colour(v, s), i)
            for i, v in enumerate(values.tolist()))
        positional += (f'<div class="positions" data-kind="{html.escape(label)}"><span class="pos-label">'
                       f'{html.escape(label)} ({float(values.sum()):+.3f}):</span> {cells}</div>')
    return (f'<div class="lxt-explanation" data-method="{html.escape(exp.method)}">{picture}'
            f'<div class="head">{html.escape(exp.method)} — target {target}{contrast} '
            f'(value {exp.logit:+.3f}){legend}</div><div class="tokens">{"".join(spans)}</div>{positional}{note}</div>')


def html_page(explanations: Sequence, sink: str = "inline") -> str:
    body = "\n".join(html_fragment(e, sink) for e in explanations)
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>lxt explanation</title>"
            "<style>body{font-family:sans-serif;margin:2em}.tokens{font-family:monospace;"
            "font-size:18px;line-height:2em;white-space:pre-wrap}.tok{padding:2px 0;border-radius:3px}"
            ".head{color:#555;margin:1em 0 .3em}.positions{font-family:monospace;font-size:13px;"
            "line-height:1.8em}.pos{padding:1px 4px;margin-right:2px;border-radius:3px}"
            ".pos-label{color:#555}</style></head><body>\n"
            f"{body}\n</body></html>\n")


def png(exp, path: str, sink: str = "inline") -> str:
    separate = _separate(exp, sink)
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with plt.rc_context({"text.usetex": False}):  # a matplotlibrc may turn LaTeX on for all text
        if exp.tokens is None:
            return _png_image(exp, path, plt)
        return _png_tokens(exp, path, plt, separate)


def _overlay(ax, exp) -> None:
    """The image (greyscale) with its pixel relevance on top, red / blue."""
    img = exp.image
    grey = img.mean(0) if img.dim() == 3 else img
    ax.imshow(grey.numpy(), cmap="gray")
    s = _scale(exp.image_relevance)
    ax.imshow(exp.image_relevance.numpy(), cmap="bwr", vmin=-s, vmax=s, alpha=0.7)
    ax.set_title(f"image: {float(exp.image_relevance.sum()):+.3f}", fontsize=9, **_LITERAL)
    ax.axis("off")


def image_png_bytes(exp) -> bytes:
    """The image heatmap of a text-with-image explanation as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with plt.rc_context({"text.usetex": False}):
        fig = plt.figure(figsize=(3, 3), dpi=100)
        _overlay(fig.add_axes([0, 0, 1, 0.92]), exp)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
    return buf.getvalue()


def _png_tokens(exp, path, plt, separate=False):
    s = _joint_scale(exp, separate)
    with_image = getattr(exp, "image_relevance", None) is not None
    positional = _positional_rows(exp)
    rows = 1 + len(exp.tokens) // (8 if with_image else 12)
    rows += sum(1 + len(values) // 24 for _, values in positional)
    fig = plt.figure(figsize=(10, max(3.2 if with_image else 0, 1.0 + 0.45 * rows) + (0.6 if separate else 0)),
                     dpi=120)
    left = 0.0
    if with_image:  # the image heatmap beside the coloured prompt
        _overlay(fig.add_axes([0.01, 0.05, 0.28, 0.82]), exp)
        left = 0.31
    ax = fig.add_axes([0, 0, 1, 1])
    ax.axis("off")
    renderer = fig.canvas.get_renderer()
    x, y, line = left + 0.01, 0.80, 0.22 / max(1, rows)
    title = f"{exp.method}: target {exp.target!r}" + (f" vs {exp.contrast!r}" if exp.contrast is not None else "")
    legend = "; the user's message boxed" if any(_user(exp)) else ""
    ax.text(0.01, 0.95, title + f"  (value {exp.logit:+.3f}){legend}", fontsize=10, va="top",
            color="#444", **_LITERAL)
    sink_box = separate
    for tok, r, user in zip(exp.tokens, exp.relevance.tolist(), _user(exp)):
        rgb = tuple(c / 255 for c in colour(r, s))
        edge = dict(edgecolor="#222", linewidth=1.0) if user else dict(edgecolor="none")
        t = ax.text(x, y, _show_token(tok), fontsize=13, family="monospace", va="top",
                    bbox=dict(facecolor=rgb, pad=2, **edge), **_LITERAL)
        width = t.get_window_extent(renderer=renderer).width / fig.bbox.width
        x += width + 0.004
        if sink_box:  # the first token: boxed, its share beside it
            sink_box = False
            t.get_bbox_patch().set(edgecolor="#222", linewidth=2.5)
            label = ax.text(x + 0.004, y, sink_label(exp), fontsize=9, va="top", color="#222", **_LITERAL)
            x += label.get_window_extent(renderer=renderer).width / fig.bbox.width + 0.02
        if x > 0.93:
            x, y = left + 0.01, y - max(line, 0.12)
    for label, values in positional:  # under the tokens: relevance per position
        x, y = left + 0.01, y - max(line, 0.12)
        t = ax.text(x, y, f"{label} ({float(values.sum()):+.3f}):", fontsize=9, va="top", color="#444", **_LITERAL)
        x += t.get_window_extent(renderer=renderer).width / fig.bbox.width + 0.01
        for i, v in enumerate(values.tolist()):
            rgb = tuple(c / 255 for c in colour(v, s))
            t = ax.text(x, y, str(i), fontsize=9, family="monospace", va="top",
                        bbox=dict(facecolor=rgb, pad=2, edgecolor="none"), **_LITERAL)
            x += t.get_window_extent(renderer=renderer).width / fig.bbox.width + 0.006
            if x > 0.95:
                x, y = left + 0.01, y - max(line, 0.12)
    if separate:
        import textwrap

        ax.text(0.01, 0.02, textwrap.fill(SINK_NOTE, 150), fontsize=7, va="bottom", color="#555", **_LITERAL)
    fig.savefig(path)
    plt.close(fig)
    return path


def _png_image(exp, path, plt):
    img = exp.image
    fig, axes = plt.subplots(1, 2, figsize=(6, 3), dpi=120)
    shown = img.permute(1, 2, 0) if img.shape[0] in (3, 4) else img[0]
    shown = (shown - shown.min()) / (shown.max() - shown.min() + 1e-12)
    axes[0].imshow(shown.numpy(), cmap=None if shown.dim() == 3 else "gray")
    axes[0].set_title("input", **_LITERAL)
    s = _scale(exp.relevance)
    axes[1].imshow(shown.numpy() if shown.dim() == 2 else shown.mean(-1).numpy(), cmap="gray")
    axes[1].imshow(exp.relevance.numpy(), cmap="bwr", vmin=-s, vmax=s, alpha=0.7)
    axes[1].set_title(f"{exp.method}: class {exp.target}", **_LITERAL)
    for a in axes:
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def show_image(exp) -> None:
    print(f"{exp.method}: class {exp.target} (logit {exp.logit:+.3f}); relevance map "
          f"{tuple(exp.relevance.shape)}, sum {float(exp.relevance.sum()):+.3f}. Use to_png(path) to see it.")
