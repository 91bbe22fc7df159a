"""Monitoring: what a model's data looked like (the reference profile frozen with each registry
version), how far new data is from it (drift), and the HTML reports people look at.

  features.py  per-text features from the model's own tokenizer: token length, truncation,
               unknown-token share, character-script mix, a hashed bag-of-tokens embedding
  profile.py   a profile (histograms, distributions, an embedding sample) of texts and the
               model's predictions on them; the task supplies its label/prediction parts
  drift.py     a profile against a reference profile: per-signal distances with thresholds,
               a domain classifier's ROC AUC on the embeddings, an overall verdict
  report.py    small inline-SVG charts and self-contained HTML pages (no external resources)
"""
