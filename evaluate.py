"""`python evaluate.py [key=value ...]`: see README.md and conf/evaluate.yaml."""

from aniportrait.cli import evaluate

if __name__ == "__main__":
    evaluate()
