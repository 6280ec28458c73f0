"""Hugging Face folders of LLaMA-style models (llama, qwen2, qwen3, mistral), read and written one tensor at a time.

A Hugging Face key is a model.py parameter name with a "model." prefix (the head excepted). Checkpoints
stream both ways, so opt-deus can grow an 8B model on a host that cannot hold it: CheckpointReader opens a
folder and checks every tensor's name, dtype and shape against config.json from the safetensors headers
alone; CheckpointWriter writes shards as they fill, through an AtomicFolder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from opt_deus_core.model import Block, ModelArgs, Transformer
from opt_deus_tool import CheckpointError
from opt_deus_tool.atomic import AtomicFolder, model_folder_problem
from opt_deus_tool.hf_config import args_from_config, config_from_args
from opt_deus_tool.inputs import parse_json, read_json_object

# The modules of one block in the order growth writes their tensors (weight, then bias).
BLOCK_ORDER = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
               "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
# Files a user expects to travel with the weights: tokenizer, chat template, generation defaults.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json", "chat_template.jinja", "chat_template.json")


def hf_key(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def block_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The tensors of one block of `args`' family, keyed as in `Block.state_dict()`, with their shapes, in the
    order growth writes them: model.py's own block (built on the meta device), so the two cannot disagree."""
    with torch.device("meta"):
        block = Block(args).state_dict()
    order = sorted(block, key=lambda key: (BLOCK_ORDER.index(key.rsplit(".", 1)[0]), key.endswith(".bias")))
    return {key: tuple(block[key].shape) for key in order}


def block_keys(args: ModelArgs) -> tuple[str, ...]:
    """The tensors of one block of `args`' family (biases and q/k norms included), in the order growth writes
    them: for LLaMA without biases, BLOCK_KEYS."""
    return tuple(block_shapes(args))


# The tensors of a LLaMA block without biases, in the order growth writes them.
BLOCK_KEYS = block_keys(ModelArgs(vocab_size=1, hidden_size=2, intermediate_size=2, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1, head_dim=2))


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Hugging Face key -> shape, for every tensor a checkpoint of `args` must hold."""
    h, block = args.hidden_size, block_shapes(args)
    shapes = {"model.embed_tokens.weight": (args.vocab_size, h), "model.norm.weight": (h,)}
    for layer in range(args.num_hidden_layers):
        shapes.update({f"model.layers.{layer}.{key}": shape for key, shape in block.items()})
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, h)
    return shapes


def load_pretrained(path, dtype: torch.dtype | None = None, device=None) -> Transformer:
    """A Transformer from a Hugging Face folder, strictly: every tensor used, every shape checked, every value
    finite (a NaN would surface only steps into training, or as a perplexity of nan).

    dtype None: the dtype config.json states, float32 if none; a checkpoint that mixes dtypes needs one given.
    Built on the meta device and allocated once in that dtype: peak memory is the model plus one tensor."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise CheckpointError(f"`dtype` must be a floating-point torch.dtype such as torch.float32, got {dtype!r}")
    reader = CheckpointReader(path)
    if dtype is None:
        reader.check_one_dtype("`dtype`")
    stated = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(reader.args.dtype, torch.float32)
    with torch.device("meta"):
        model = Transformer(reader.args).to(dtype or stated)
    model = model.to_empty(device=device or "cpu")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(reader.tensor(hf_key(name)))
            if not torch.isfinite(param).all():
                raise CheckpointError(f"{reader.files[hf_key(name)]}: tensor {hf_key(name)} contains NaN or inf")
    reader.check_all_read()
    return model


def save_pretrained(model: Transformer, path, max_shard_size: int | str = "5GB", copy_files_from=None,
                    overwrite: bool = False, atomic: bool = True):
    """`model` as a Hugging Face folder at `path` (config.json, safetensors shards, the tokenizer files of
    copy_files_from). As the command lines: a non-empty `path` is replaced only with overwrite=True, and only if
    it holds a model (its own tokenizer files then go with it); atomic=False writes into `path`, an empty
    folder the caller renames."""
    save_state_dict(model.current_args(), model.state_dict(), path, max_shard_size, copy_files_from, overwrite,
                    atomic)


def save_state_dict(args: ModelArgs, state_dict: dict, path, max_shard_size: int | str = "5GB",
                    copy_files_from=None, overwrite: bool = False, atomic: bool = True):
    # A Transformer's state dict (model.py names), e.g. one gathered from FSDP shards, as save_pretrained.
    args = dataclasses.replace(args, dtype=dtype_name(state_dict["embed_tokens.weight"].dtype))
    folder = None if isinstance(copy_files_from, dict) else copy_files_from  # a dict: side files' bytes
    with CheckpointWriter(path, max_shard_size=max_shard_size, overwrite=overwrite, atomic=atomic,
                          inputs=[("`copy_files_from`", folder)], name="`path`",
                          replaceable=model_folder_problem) as writer:
        for name, tensor in state_dict.items():
            writer.add(hf_key(name), tensor)
        writer.finish(config_from_args(args), copy_files_from=copy_files_from)


def file_identity(path: Path) -> tuple | None:
    try:
        st = os.stat(path)  # through a symlink (a Hugging Face cache's snapshot links to its blobs)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class FolderSnapshot:
    """What a model folder held when a command began reading it: each file that makes the model (config, weights,
    side files) by identity (device, inode, size, modification time). A folder replaced meanwhile (another
    `opt-deus --overwrite` into it) or a file rewritten in place changes it, and check() refuses rather than let
    one output mix two versions. side_files(): the side files' bytes, read once, for the outputs that ship them."""

    def __init__(self, path):
        self.path = Path(path)
        names = ["config.json", "model.safetensors.index.json", *SIDE_FILES,
                 *sorted(f.name for f in self.path.glob("*.safetensors"))]
        self.identity = {name: file_identity(self.path / name) for name in dict.fromkeys(names)
                         if (self.path / name).is_file()}

    def check(self):
        for name, before in self.identity.items():
            if file_identity(self.path / name) != before:
                raise CheckpointError(f"{self.path / name}: changed while this command was reading {self.path} "
                                      f"(another process replaced or rewrote it); nothing was written: run again "
                                      f"once that process is done")

    def side_files(self) -> dict[str, bytes]:
        files = {name: (self.path / name).read_bytes() for name in SIDE_FILES if name in self.identity}
        self.check()  # the bytes read are the ones the snapshot saw
        return files


class CheckpointReader:
    """A Hugging Face folder read one tensor at a time. Opening checks every tensor's name, dtype and shape
    against the config, from the safetensors headers alone. Files closed between blocks (release) reopen by
    path: each reopening, and check_all_read, refuses a folder that changed since it was opened (snapshot)."""

    def __init__(self, path):
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a folder")
        self.snapshot = FolderSnapshot(self.path)  # before anything is read
        self._opened = set()  # files opened at least once
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: missing (not a Hugging Face checkpoint folder)")
        config = read_json_object(config_path, CheckpointError)
        try:
            self.args = args_from_config(config)
        except CheckpointError as e:
            raise CheckpointError(f"{config_path}: {e}") from None
        self._handles = {}  # file -> open safetensors file
        self._read = set()  # keys handed out, for check_all_read
        self.files = self._weight_files()  # key -> file
        self.block_keys = block_keys(self.args)
        self._check_tensors()

    def _weight_files(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if not index.is_file() and not single.is_file():
            raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        if index.is_file() and single.is_file():  # transformers would load the single file: which is the model?
            raise CheckpointError(f"{self.path}: holds both model.safetensors and model.safetensors.index.json; "
                                  f"remove the one that is not the model")
        if not index.is_file():
            return dict.fromkeys(self._open(single).keys(), single)
        try:
            weight_map = parse_json(index.read_text(encoding="utf-8"), str(index), CheckpointError)["weight_map"]
            files = {key: self.path / name for key, name in weight_map.items()}
            assert all(isinstance(name, str) and name == Path(name).name for name in weight_map.values())
        except (CheckpointError, UnicodeDecodeError, KeyError, TypeError, AttributeError, AssertionError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
        for file in set(files.values()):
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in {index.name} but missing")
        return files

    def _open(self, file: Path):
        if file not in self._handles:
            if file in self._opened:  # reopened after release(): still the file it was?
                self.snapshot.check()
            self._opened.add(file)
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
        return self._handles[file]

    def _check_tensors(self):
        expected = expected_shapes(self.args)
        if self.args.tie_word_embeddings and "lm_head.weight" in self.files:
            # Some tied checkpoints store the head anyway; check_all_read checks it equals the embeddings.
            expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
        for key, file in self.files.items():
            if key not in expected:
                raise CheckpointError(f"{file}: unexpected tensor {key} (not part of a {self.args.model_type} "
                                      f"model with this config)")
            if key not in self._open(file).keys():
                raise CheckpointError(f"{file}: tensor {key} listed in the index but not in the file")
            header = self._open(file).get_slice(key)
            if header.get_dtype() not in ("F32", "F16", "BF16", "F64"):
                raise CheckpointError(f"{file}: tensor {key} is stored as {header.get_dtype()}; weights "
                                      f"must be floating point (F32, F16, BF16, F64)")
            if tuple(header.get_shape()) != expected[key]:
                raise CheckpointError(f"{file}: tensor {key} has shape {header.get_shape()}, "
                                      f"config implies {list(expected[key])}")
        missing = [key for key in expected if key not in self.files]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.path}: missing tensor {missing[0]}{more}")

    def check_one_dtype(self, remedy: str):
        # A base that mixes dtypes (bf16 embeddings, float32 layers) cannot be written in "its" dtype.
        dtypes = {}
        for key in self.files:
            dtypes.setdefault(self.dtype(key), key)
        if len(dtypes) > 1:
            found = ", ".join(f"{key} in {dtype_name(dtype)}" for dtype, key in dtypes.items())
            raise CheckpointError(f"{self.path}: its tensors mix dtypes ({found}); pass {remedy} to choose one")

    def dtype(self, key: str) -> torch.dtype:
        stored = self._open(self.files[key]).get_slice(key).get_dtype()  # "BF16", ...
        return next(dtype for dtype, name in SAFETENSORS_DTYPES.items() if name == stored)

    def tensor(self, key: str, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        t = self._open(self.files[key]).get_tensor(key)
        self._read.add(key)
        return t.to(device=device, dtype=dtype or t.dtype)

    def block(self, layer: int, dtype: torch.dtype | None = None, device=None) -> dict[str, torch.Tensor]:
        """The tensors of one base block, keyed as in `Block.state_dict()`."""
        return {key: self.tensor(f"model.layers.{layer}.{key}", dtype, device) for key in self.block_keys}

    def release(self):
        # Closes the memory maps: pages read from a map count towards the process's resident memory
        # until it is closed, so a streaming pass calls this between blocks. Files reopen on the next read.
        self._handles.clear()

    def check_all_read(self):
        # Strict loading: every tensor of the checkpoint was used; a tied checkpoint's redundant head
        # by checking it is what tying implies.
        if "lm_head.weight" in self.files and self.args.tie_word_embeddings:
            if not torch.equal(self.tensor("lm_head.weight"), self.tensor("model.embed_tokens.weight")):
                raise CheckpointError(f"{self.path}: tie_word_embeddings is true but lm_head.weight differs "
                                      f"from the embeddings")
        unread = [key for key in self.files if key not in self._read]
        if unread:
            raise CheckpointError(f"{self.path}: tensor {unread[0]} was never used ({len(unread)} unused)")
        self.snapshot.check()  # every tensor came from the folder as it was when opened


class CheckpointWriter:
    """Writes a Hugging Face folder shard by shard into an AtomicFolder, holding one tensor at a time.

    A safetensors file starts with a header giving every tensor's offset, so it cannot be written
    front to back as tensors arrive. Each tensor's bytes go straight to a scratch data file; when a
    shard is full its header is written and the data copied behind it. Memory stays at one tensor
    whatever the model's size, at the price of writing the weights twice.
    """

    def __init__(self, path, max_shard_size: int | str = "5GB", overwrite: bool = False, inputs=(),
                 atomic: bool = True, name: str = "`out`", replaceable=model_folder_problem):
        # atomic=False writes straight into `path`, an empty folder the caller made and will rename
        # (a training checkpoint adds optimizer state to it).
        self.max_shard_size = parse_size(max_shard_size)
        self.folder = (AtomicFolder(path, overwrite=overwrite, inputs=inputs, name=name, replaceable=replaceable)
                       if atomic else None)
        self.path = Path(path)
        self.tmp = self.folder.tmp if atomic else Path(path).absolute()
        self.shard_files: list[str] = []  # finished shards
        self.key_to_shard: dict[str, int] = {}  # for the finished shards
        self.header: dict[str, dict] = {}  # the open shard's entries, its data in self.data
        self.data = None
        self.offset = 0  # bytes in the open shard
        self.total_bytes = 0

    def __enter__(self):
        if self.folder is not None:
            self.folder.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.data is not None:
            self.data.close()
        if self.folder is not None:
            self.folder.__exit__(exc_type, exc, tb)
        if isinstance(exc, OSError) and exc.filename is None:  # a full disk's write error names no file: ours
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.path)) from exc

    def add(self, key: str, tensor: torch.Tensor):
        if key in self.key_to_shard or key in self.header:
            raise ValueError(f"tensor {key} written twice")
        # A down-cast (float32 -> float16 tops out at 65504) must not turn large values into inf silently.
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            fp16 = tensor.dtype == torch.float16
            hint = " (values beyond float16's range 65504? use bfloat16 or float32)" if fp16 else ""
            raise CheckpointError(f"tensor {key}: not finite (inf or NaN) as {dtype_name(tensor.dtype)}{hint}")
        nbytes = tensor.numel() * tensor.element_size()
        if self.header and self.offset + nbytes > self.max_shard_size:
            self._close_shard()
        if self.data is None:
            self.data = open(self.tmp / "shard.data", "wb")
        # Raw little-endian bytes as safetensors stores them (bfloat16 through a uint8 view: numpy has none).
        self.data.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.header[key] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [self.offset, self.offset + nbytes]}
        self.offset += nbytes
        self.total_bytes += nbytes

    def _close_shard(self):
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data that follows starts 8-byte aligned
        name = f"shard-{len(self.shard_files):05d}.tmp"
        with open(self.tmp / name, "wb") as shard:
            shard.write(len(header).to_bytes(8, "little") + header)
            if self.data is not None:  # None in a checkpoint without tensors
                self.data.close()
                with open(self.tmp / "shard.data", "rb") as data:
                    shutil.copyfileobj(data, shard, 16 * 2**20)
                os.remove(self.tmp / "shard.data")
        self.key_to_shard.update(dict.fromkeys(self.header, len(self.shard_files)))
        self.shard_files.append(name)
        self.header, self.data, self.offset = {}, None, 0

    def finish(self, config: dict, copy_files_from=None, extra_files: dict[str, str] | None = None):
        if self.header or not self.shard_files:
            self._close_shard()
        n = len(self.shard_files)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for tmp_name, name in zip(self.shard_files, names):
            os.replace(self.tmp / tmp_name, self.tmp / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {key: names[i] for key, i in sorted(self.key_to_shard.items())}}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (self.tmp / name).write_text(text)
        if isinstance(copy_files_from, dict):  # side files read when the command started (FolderSnapshot)
            for name, data in copy_files_from.items():
                (self.tmp / name).write_bytes(data)
        elif copy_files_from is not None:
            for name in SIDE_FILES:
                if (Path(copy_files_from) / name).is_file():
                    shutil.copy2(Path(copy_files_from) / name, self.tmp / name)
        if self.folder is not None:
            self.folder.commit()


def parse_size(size: int | str) -> int:
    # "5GB", "500MB", "2GiB", "1048576" -> bytes (> 0); anything else is a ValueError naming the text.
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    text = str(size).strip().upper()
    unit = next((unit for unit in units if text.endswith(unit)), "B")
    try:
        value = float(text.removesuffix(unit)) * units[unit]
    except ValueError:
        value = math.nan
    if not 1 <= value < math.inf:
        raise ValueError(f"{size!r} is not a size: expected a positive number of bytes, e.g. 5GB, 500MB, 2GiB")
    return int(value)
