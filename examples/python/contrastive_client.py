"""A Python client of `contrastive serve`, with grpcio stubs generated from the repository's
proto/ folder at start (grpcio-tools; `scripts/setup-python` installs both).

    # embed every image of a folder; prints {"model", "version", "embeddings": {file: [...]}}
    python examples/python/contrastive_client.py --addr 127.0.0.1:50051 embed IMAGES/

    # upload FOLDER/<class>/<image>, start a SupCon fine-tune, print its events until it ends
    python examples/python/contrastive_client.py --addr 127.0.0.1:50051 finetune FOLDER/ \
        --base-model fmnist-simclr --output-model my-model --epochs 10

With API keys, pass --api-key (or set CONTRASTIVE_API_KEY). The fine-tune exits 0 when the job
succeeds, 1 when it fails or is cancelled, printing the job's last state as JSON.
"""

import argparse
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
CHUNK_IMAGES = 64  # images per UploadDataset message


def load_stubs():
    """Generates the contrastive.v1 modules into a temporary folder and imports them."""
    out = tempfile.mkdtemp(prefix="contrastive-stubs-")
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "contrastive" / "v1").glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    status = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}",
                          f"--python_out={out}", f"--grpc_python_out={out}", *protos])
    if status != 0:
        sys.exit(f"protoc failed on {protos}")
    sys.path.insert(0, out)
    names = ["embedding_pb2", "embedding_pb2_grpc", "finetune_pb2", "finetune_pb2_grpc"]
    return {name: importlib.import_module(f"contrastive.v1.{name}") for name in names}


def images_in(folder: Path):
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def embed(stubs, channel, metadata, args) -> int:
    pb, rpc = stubs["embedding_pb2"], stubs["embedding_pb2_grpc"]
    client = rpc.EmbeddingServiceStub(channel)
    files = images_in(Path(args.folder))
    if not files:
        sys.exit(f"no .png or .jpg image in {args.folder}")
    embeddings, model, version = {}, "", 0
    for start in range(0, len(files), args.batch):
        batch = files[start:start + args.batch]
        request = pb.EmbedRequest(model=args.model, inputs=[pb.Input(image=p.read_bytes()) for p in batch])
        response = client.Embed(request, metadata=metadata, timeout=60)
        model, version = response.model, response.version
        for path, embedding in zip(batch, response.embeddings):
            embeddings[path.name] = list(embedding.values)
    print(json.dumps({"model": model, "version": version, "embeddings": embeddings}))
    return 0


def finetune(stubs, channel, metadata, args) -> int:
    pb, rpc = stubs["finetune_pb2"], stubs["finetune_pb2_grpc"]
    client = rpc.FineTuneServiceStub(channel)
    labelled = [(label_dir.name, path) for label_dir in sorted(Path(args.folder).iterdir()) if label_dir.is_dir()
                for path in images_in(label_dir)]
    if not labelled:
        sys.exit(f"no <class>/<image> under {args.folder}")

    def chunks():
        for start in range(0, len(labelled), CHUNK_IMAGES):
            images = [pb.LabeledImage(image=path.read_bytes(), label=label)
                      for label, path in labelled[start:start + CHUNK_IMAGES]]
            yield pb.UploadDatasetChunk(name=Path(args.folder).name if start == 0 else "", images=images)

    dataset = client.UploadDataset(chunks(), metadata=metadata, timeout=300)
    print(json.dumps({"dataset": dataset.dataset_id, "images": dataset.size,
                      "classes": dict(dataset.class_counts)}), flush=True)
    job = client.CreateJob(pb.CreateJobRequest(
        base_model=args.base_model, output_model=args.output_model, dataset_id=dataset.dataset_id,
        hyper_parameters=pb.HyperParameters(epochs=args.epochs, seed=args.seed), allow_worse=args.allow_worse),
        metadata=metadata, timeout=60)
    last = job
    for event in client.WatchJob(pb.WatchJobRequest(job_id=job.job_id), metadata=metadata):
        last = event.job
        kind = event.WhichOneof("event")
        value = getattr(event, kind)
        if kind == "state":
            value = pb.JobState.Name(value)
        elif kind in ("epoch", "before", "after"):
            value = MessageToDict(value, preserving_proto_field_name=True)
        print(json.dumps({"job": job.job_id, kind: value}), flush=True)
    summary = {"job": last.job_id, "state": pb.JobState.Name(last.state), "output_model": last.output_model,
               "output_version": last.output_version, "message": last.message,
               "before": MessageToDict(last.before, preserving_proto_field_name=True),
               "after": MessageToDict(last.after, preserving_proto_field_name=True)}
    print(json.dumps(summary))
    return 0 if last.state == pb.JOB_STATE_SUCCEEDED else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--addr", default="127.0.0.1:50051", help="the server's gRPC address")
    parser.add_argument("--api-key", default=os.environ.get("CONTRASTIVE_API_KEY"))
    commands = parser.add_subparsers(dest="command", required=True)
    embed_args = commands.add_parser("embed", help="embed every image of a folder")
    embed_args.add_argument("folder")
    embed_args.add_argument("--model", default="", help="empty: the server's default model")
    embed_args.add_argument("--batch", type=int, default=64)
    tune_args = commands.add_parser("finetune", help="upload FOLDER/<class>/<image> and fine-tune on it")
    tune_args.add_argument("folder")
    tune_args.add_argument("--base-model", required=True)
    tune_args.add_argument("--output-model", default="")
    tune_args.add_argument("--epochs", type=int, default=0, help="0: the server's default")
    tune_args.add_argument("--seed", type=int, default=0)
    tune_args.add_argument("--allow-worse", action="store_true",
                           help="publish even when the held-out k-NN accuracy falls")
    args = parser.parse_args()

    stubs = load_stubs()
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    with grpc.insecure_channel(args.addr, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        try:
            return (embed if args.command == "embed" else finetune)(stubs, channel, metadata, args)
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
