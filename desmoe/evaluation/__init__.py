"""Evaluation of trained models (language-model tasks; the vision side lives in desmoe.vision)."""
