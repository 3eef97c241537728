#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target under fuzz/seeds/ (committed; rerun after a format
changes). Needs Pillow (pip install pillow). Small inputs on purpose: libFuzzer mutates them fast."""
import io
import json
import pathlib
import struct

from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent
SEEDS = ROOT / "seeds"


def image(mode, size, fmt, **options):
    picture = Image.new(mode, size)
    for x in range(size[0]):
        for y in range(size[1]):
            value = (x * 37 + y * 11) % 256
            channels = (value, 255 - value, x * 8 % 256, 200)
            picture.putpixel((x, y), value if mode in ("L", "P", "I;16") else channels[: len(mode)])
    out = io.BytesIO()
    picture.save(out, fmt, **options)
    return out.getvalue()


IMAGES = {
    "gray28.png": image("L", (28, 28), "PNG"),
    "rgb8.png": image("RGB", (8, 8), "PNG"),
    "rgba5x3.png": image("RGBA", (5, 3), "PNG"),
    "palette4.png": image("P", (4, 4), "PNG"),
    "gray16.png": image("I;16", (6, 6), "PNG"),
    "gray28.jpg": image("L", (28, 28), "JPEG", quality=80),
    "rgb16.jpg": image("RGB", (16, 16), "JPEG", quality=90),
    "rgb16-progressive.jpg": image("RGB", (16, 16), "JPEG", quality=90, progressive=True),
}


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number, wire_type, payload):
    key = varint(number << 3 | wire_type)
    if wire_type == 2:
        return key + varint(len(payload)) + payload
    return key + payload


def tensor(shape, values):
    packed_shape = b"".join(varint(d) for d in shape)
    packed_values = b"".join(struct.pack("<f", v) for v in values)
    return field(1, 2, packed_shape) + field(2, 2, packed_values)


def write(target, name, data):
    folder = SEEDS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


for name, data in IMAGES.items():
    write("image", name, data)

# EmbedRequest: model (1), version (2), inputs (3: image 1 | tensor 2), normalize (4), dimensions (5).
write("embed_request", "one-image", field(3, 2, field(1, 2, IMAGES["gray28.png"])))
write("embed_request", "jpeg-and-png",
      field(1, 2, b"fmnist-simclr") + field(3, 2, field(1, 2, IMAGES["rgb16.jpg"]))
      + field(3, 2, field(1, 2, IMAGES["rgb8.png"])) + field(5, 0, varint(64)))
write("embed_request", "tensor-hw", field(3, 2, field(2, 2, tensor([28, 28], [0.5] * 784))))
write("embed_request", "tensor-chw", field(2, 0, varint(1)) + field(3, 2, field(2, 2, tensor([1, 28, 28], [0.25] * 784)))
      + field(4, 0, varint(0)))
write("embed_request", "empty-input", field(3, 2, b""))

shipped = ROOT.parent / "models" / "fmnist-simclr" / "1" / "manifest.json"
write("manifest", "shipped.json", shipped.read_bytes())
minimal = json.loads(shipped.read_text())
minimal["evaluation"] = None
write("manifest", "no-evaluation.json", json.dumps(minimal, separators=(",", ":")).encode())


def safetensors(tensors):
    header, data = {}, b""
    for name, (dtype, shape, payload) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + data


floats = lambda n: b"".join(struct.pack("<f", i / 8) for i in range(n))
write("safetensors", "f32", safetensors({"layer.weight": ("F32", [4, 3], floats(12)), "layer.bias": ("F32", [3], floats(3))}))
write("safetensors", "f64-with-buffer", safetensors({
    "layer.weight": ("F64", [4, 3], b"".join(struct.pack("<d", i) for i in range(12))),
    "layer.bias": ("F16", [3], b"\x00\x3c" * 3),
    "buffer.running_mean": ("F32", [3], floats(3)),
}))
write("safetensors", "wrong-shape", safetensors({"layer.weight": ("F32", [3, 4], floats(12)), "layer.bias": ("F32", [3], floats(3))}))


def dataset(images):
    out = b"CTRDSET\0" + struct.pack("<I", 1)
    for label, data in images:
        out += struct.pack("<I", len(label)) + label + struct.pack("<I", len(data)) + data
    return out


write("dataset", "two-images", dataset([(b"shirt", IMAGES["gray28.png"]), (b"boot", IMAGES["rgb8.png"])]))
write("dataset", "header-only", dataset([]))
# UploadDatasetChunk: name (1), images (2: LabeledImage { image 1, label 2 }).
write("dataset", "upload-chunk", field(1, 2, b"upload") + field(2, 2, field(1, 2, IMAGES["rgb8.png"]) + field(2, 2, b"bag")))
