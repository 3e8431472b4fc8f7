"""The library behind buffer.py, distill.py and eval.py: trajectory matching (MTT) and its AST, ATT and MCT pieces."""
