"""Embeds images through the official `openai` package against the server's OpenAI-compatible
endpoint, the way vector databases' embedding functions call it. Prints JSON for the Rust test
(tests/python_clients.rs) to compare with the gRPC embeddings:

    {"float": [[...], ...], "base64": [[...], ...], "default": [[...], ...], "model": "...",
     "models": [...], "errors": {"bad_base64": [status, message], ...}}

usage: openai_embeddings.py BASE_URL API_KEY MODEL IMAGE...
"""

import base64
import json
import struct
import sys

import openai


def main() -> None:
    base_url, api_key, model, *paths = sys.argv[1:]
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    inputs = []
    for i, path in enumerate(paths):
        with open(path, "rb") as f:
            encoded = base64.b64encode(f.read()).decode()
        # Half as plain base64, half as data URIs: both are accepted.
        inputs.append(encoded if i % 2 == 0 else f"data:image/png;base64,{encoded}")

    floats = client.embeddings.create(model=model, input=inputs, encoding_format="float")
    # The package asks for base64 when no format is given and decodes it itself.
    default = client.embeddings.create(model=model, input=inputs)
    # The raw base64 answer, decoded here: little-endian f32.
    raw = client.embeddings.with_raw_response.create(model=model, input=inputs, encoding_format="base64")
    raw_rows = []
    for item in json.loads(raw.text)["data"]:
        data = base64.b64decode(item["embedding"])
        raw_rows.append(list(struct.unpack(f"<{len(data) // 4}f", data)))

    errors = {}
    for name, call in {
        "bad_base64": lambda: client.embeddings.create(model=model, input=["%%%"]),
        "unknown_model": lambda: client.embeddings.create(model="no-such-model", input=inputs[:1]),
        "wrong_key": lambda: openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
        .embeddings.create(model=model, input=inputs[:1]),
    }.items():
        try:
            call()
            errors[name] = [200, ""]
        except openai.APIStatusError as error:
            errors[name] = [error.status_code, error.message]

    print(json.dumps({
        "float": [d.embedding for d in floats.data],
        "default": [list(d.embedding) for d in default.data],
        "base64": raw_rows,
        "model": floats.model,
        "models": [m.id for m in client.models.list()],
        "errors": errors,
    }))


if __name__ == "__main__":
    main()
