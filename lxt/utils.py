"""Published ``lxt.utils`` (``clean_tokens``, ``pdf_heatmap``): replaced by the views of
:class:`lxt.Explanation`."""
raise ImportError(
    "lxt: lxt.utils (clean_tokens, pdf_heatmap) is gone; lxt.explain(model, tokenizer, prompt) "
    "returns an Explanation whose .tokens are the clean token strings and whose "
    ".to_png(path) / .to_html(path) draw the heatmap, no LaTeX needed (see docs/migration.md)."
)
