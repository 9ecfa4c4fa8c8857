"""evo2-cli: FASTA to a trained Evo 2 (StripedHyena 2) checkpoint and back."""

__version__ = "0.1.0"
