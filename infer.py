"""`python infer.py [key=value ...]`: see README.md and conf/infer.yaml."""

from aniportrait.cli import infer

if __name__ == "__main__":
    infer()
