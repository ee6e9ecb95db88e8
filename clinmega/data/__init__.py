"""Data preparation: pretraining corpora (indexed datasets, blends), SFT (templates, masks, packing),
decontamination. See docs/data.md."""
