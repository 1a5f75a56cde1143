"""What a trained model does: depth maps and halting plots (figures.py, plots.py) and its
accuracy against compute when its gate centre is shifted (tradeoff.py)."""
