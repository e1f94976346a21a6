"""`python train.py [key=value ...]`: see README.md and conf/train.yaml."""

from aniportrait.cli import train

if __name__ == "__main__":
    train()
