"""`vision-gpt push`: upload any saved repo (assemble, convert, the demo, training) to the Hub."""

from .options import add_command


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "push", help="upload a saved model folder, with its model card, to a Hub model repo",
        description="Upload FOLDER (written by `vision-gpt assemble`, `convert`, `demo` or `train`) to the Hub model "
                    "repo REPO_ID in one commit: the weights, fp16/, the model card, the remote code and the "
                    "processor files; training leftovers (checkpoint-*/, runs/, *.log) stay behind. The repo, and the "
                    "branch --revision, are created when missing. The token comes from --token, $HF_TOKEN or `hf auth "
                    "login`; $HF_ENDPOINT names another Hub.")
    parser.add_argument("folder", metavar="FOLDER", help="the saved model folder")
    parser.add_argument("repo_id", metavar="REPO_ID", help="the Hub model repo, e.g. user/vision-gpt-flickr8k")
    parser.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                                                                "visibility)")
    parser.add_argument("--revision", metavar="BRANCH", help="the branch to commit to (default: main)")
    parser.add_argument("--commit-message", default="Upload vision-gpt model", help="the commit's message")
    parser.add_argument("--token", help="a Hub token with write access (default: $HF_TOKEN or the saved login)")
    parser.set_defaults(func=run)


def run(args) -> int:
    import sys

    from huggingface_hub.errors import HfHubHTTPError

    from ..export.hub import push_folder

    try:
        url = push_folder(args.folder, args.repo_id, token=args.token, private=True if args.private else None,
                          revision=args.revision, commit_message=args.commit_message)
    except (OSError, HfHubHTTPError) as error:  # the client's errors, which push_folder names the repo and step in
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Pushed {args.folder} to {args.repo_id}: {url}")
    return 0
