"""Networks, model cards, inference backends and analysers of stemlive."""
