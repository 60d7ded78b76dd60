"""`python -m sparsekern demo`: what `make run` runs until the experiment pipeline lands."""
import argparse

from sparsekern.demo import main as demo_main


def main(argv=None):
    parser = argparse.ArgumentParser(prog="sparsekern")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prune an nn.Linear, convert it, print the measured speed-up")
    demo.add_argument("--features", type=int, default=4096)
    demo.add_argument("--batch", type=int, default=256)
    demo.add_argument("--sparsity", type=float, default=0.9)
    demo.add_argument("--block", type=int, default=32)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo_main(args.features, args.batch, args.sparsity, args.block)


if __name__ == "__main__":
    main()
