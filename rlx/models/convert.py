"""Checkpoint conversion: Hugging Face folders <-> rlx params, and rlx's own folder format.

A Hugging Face folder holds ``config.json`` and safetensors weights, either one
``model.safetensors`` or shards listed in ``model.safetensors.index.json``. Weights are
read with the numpy API of ``safetensors`` (memory-mapped, one tensor at a time); pickled
``*.bin`` checkpoints are never opened.

Name mapping (torch ``nn.Linear`` stores ``weight [out, in]``; rlx kernels are
``[in, out]``, so every ``*_proj`` and ``lm_head`` weight is transposed):

  model.embed_tokens.weight [V, D]                 trunk/embed/embedding [V, D]
  model.layers.{i}.input_layernorm.weight          trunk/layers/{i}/input_norm/scale
  model.layers.{i}.self_attn.q_proj.weight, .bias  trunk/layers/{i}/attn/q_proj/kernel, bias
    (k_proj, v_proj alike; biases only for Qwen2)
  model.layers.{i}.self_attn.o_proj.weight         trunk/layers/{i}/attn/o_proj/kernel
  model.layers.{i}.post_attention_layernorm.weight trunk/layers/{i}/post_attn_norm/scale
  model.layers.{i}.mlp.gate_proj.weight            trunk/layers/{i}/mlp/gate_proj/kernel
    (up_proj, down_proj alike)
  model.norm.weight                                trunk/final_norm/scale
  lm_head.weight [V, D]                            lm_head/kernel [D, V]  (untied only)

Tolerated extras on import: rotary ``inv_freq`` buffers of old checkpoints (recomputed
from the config), and ``lm_head.weight`` in a tied checkpoint when it equals the
embedding. Anything else unexpected is an error.

The rlx folder format (used by ``rlx convert``) is pickle-free as well: ``config.json``
``{"rlx_format": 1, "kind": ..., "model_config": {ModelConfig fields}}`` and
``params.safetensors`` whose keys are the '/'-joined parameter paths of
``rlx.models.api.param_paths``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
from safetensors import safe_open
from safetensors.numpy import save_file

from rlx.models import api
from rlx.models.config import ModelConfig, RopeScaling

ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")
_MODEL_TYPES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
RLX_PARAMS_FILE = "params.safetensors"
RLX_FORMAT = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "vocab.json", "merges.txt",
                   "added_tokens.json", "generation_config.json")
CHAT_TEMPLATE_DIR = "additional_chat_templates"
GENERATION_FILE = "generation_config.json"
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_SafetensorError = getattr(safetensors, "SafetensorError", Exception)


class CheckpointError(ValueError):
    """A checkpoint folder or file cannot be read or written as requested."""


class ShardError(CheckpointError):
    """A safetensors file is unreadable (truncated, corrupt header) or lacks a tensor that
    the index or the config says it holds. ``path`` is the file, ``tensor`` the tensor
    concerned (None when the file's header cannot be read and the file is not indexed).
    The message is one line naming both."""

    def __init__(self, message: str, *, path: str, tensor: str | None = None):
        super().__init__(" ".join(message.split()))
        self.path = path
        self.tensor = tensor


# --------------------------------------------------------------------------- configs


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """Maps a Hugging Face ``config.json`` dict to a ModelConfig.

    Accepts both the transformers 4 layout (top-level ``rope_theta`` and ``rope_scaling``)
    and the transformers 5 layout (``rope_parameters``). Features rlx does not implement
    (other rope types, sliding windows, MLP or output-projection bias, other
    activations) raise CheckpointError instead of loading silently wrong.
    """
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else {"qwen2": "Qwen2ForCausalLM",
                                   "llama": "LlamaForCausalLM"}.get(hf.get("model_type"))
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unsupported architecture {archs or hf.get('model_type')!r}; "
                              f"rlx supports {list(ARCHITECTURES)}")

    def need(key):
        if key not in hf:
            raise CheckpointError(f"config.json ({arch}) has no {key!r}")
        return hf[key]

    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json hidden_act={hf['hidden_act']!r}: only 'silu' "
                              "(SwiGLU) is supported")
    if hf.get("mlp_bias", False):
        raise CheckpointError("config.json mlp_bias=True is not supported")
    if arch == "LlamaForCausalLM" and hf.get("attention_bias", False):
        raise CheckpointError("config.json attention_bias=True (Llama: bias on q/k/v and "
                              "o_proj) is not supported; rlx has q/k/v bias only (Qwen2)")
    if arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window", False):
        raise CheckpointError("config.json use_sliding_window=True is not supported")
    if hf.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise CheckpointError(f"config.json partial_rotary_factor="
                              f"{hf['partial_rotary_factor']!r} is not supported")

    max_pos = int(hf.get("max_position_embeddings", 4096))
    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise CheckpointError("rope partial_rotary_factor is not supported")
    if rope_type == "default":
        scaling = None
    elif rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", max_pos)))
    else:
        raise CheckpointError(f"config.json rope type {rope_type!r} is not supported; "
                              "rlx supports 'default' and 'llama3'")
    heads = int(need("num_attention_heads"))
    try:
        return ModelConfig(
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf["head_dim"]) if hf.get("head_dim") else None,
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qkv_bias=arch == "Qwen2ForCausalLM",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=max_pos,
        )
    except ValueError as e:  # ModelConfig's own validation
        raise CheckpointError(f"config.json does not give a valid model: {e}") from e


def config_to_hf(config: ModelConfig, *, architecture: str | None = None,
                 dtype: str = "float32", extra: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Maps a ModelConfig to a Hugging Face ``config.json`` dict.

    ``architecture`` defaults to Qwen2ForCausalLM when ``qkv_bias`` (Qwen2 always has
    q/k/v bias) and LlamaForCausalLM otherwise. RoPE is written in both layouts
    (``rope_theta``/``rope_scaling`` for transformers 4, ``rope_parameters`` for 5).
    ``extra`` adds or overrides keys (e.g. ``bos_token_id``, ``eos_token_id``).
    """
    arch = architecture or ("Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unsupported architecture {arch!r}; rlx supports "
                              f"{list(ARCHITECTURES)}")
    if arch == "LlamaForCausalLM" and config.qkv_bias:
        raise CheckpointError("qkv_bias=True cannot be exported as LlamaForCausalLM (its "
                              "attention_bias also biases o_proj); use Qwen2ForCausalLM")
    if arch == "Qwen2ForCausalLM" and not config.qkv_bias:
        raise CheckpointError("Qwen2ForCausalLM always has q/k/v bias; export a "
                              "qkv_bias=False model as LlamaForCausalLM")
    if dtype not in _NP_DTYPES:
        raise CheckpointError(f"dtype={dtype!r}: expected one of {sorted(_NP_DTYPES)}")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    scaling = None
    if config.rope_scaling is not None:
        scaling = {"rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
        rope.update(scaling)
    hf: dict[str, Any] = {
        "architectures": [arch],
        "model_type": _MODEL_TYPES[arch],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if arch == "LlamaForCausalLM":
        hf.update(attention_bias=False, mlp_bias=False)
    else:
        hf.update(use_sliding_window=False, sliding_window=None,
                  max_window_layers=config.num_layers)
    hf.update(extra or {})
    return hf


# --------------------------------------------------------------------------- name map


class TensorSpec(NamedTuple):
    """One checkpoint tensor: rlx path, Hugging Face name, rlx shape, transposed?"""

    path: str
    hf_name: str
    shape: tuple[int, ...]
    transpose: bool

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.transpose else self.shape


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """Every policy parameter with its Hugging Face name, in checkpoint order."""
    d, f, v, dh = (config.hidden_size, config.intermediate_size, config.vocab_size,
                   config.head_dim)
    q, kv = config.num_heads * dh, config.num_kv_heads * dh
    specs = [TensorSpec("trunk/embed/embedding", "model.embed_tokens.weight", (v, d), False)]
    for i in range(config.num_layers):
        rl, hl = f"trunk/layers/{i}", f"model.layers.{i}"
        specs.append(TensorSpec(f"{rl}/input_norm/scale", f"{hl}.input_layernorm.weight",
                                (d,), False))
        for name, width in (("q", q), ("k", kv), ("v", kv)):
            specs.append(TensorSpec(f"{rl}/attn/{name}_proj/kernel",
                                    f"{hl}.self_attn.{name}_proj.weight", (d, width), True))
            if config.qkv_bias:
                specs.append(TensorSpec(f"{rl}/attn/{name}_proj/bias",
                                        f"{hl}.self_attn.{name}_proj.bias", (width,), False))
        specs.append(TensorSpec(f"{rl}/attn/o_proj/kernel", f"{hl}.self_attn.o_proj.weight",
                                (q, d), True))
        specs.append(TensorSpec(f"{rl}/post_attn_norm/scale",
                                f"{hl}.post_attention_layernorm.weight", (d,), False))
        for name, shape in (("gate", (d, f)), ("up", (d, f)), ("down", (f, d))):
            specs.append(TensorSpec(f"{rl}/mlp/{name}_proj/kernel",
                                    f"{hl}.mlp.{name}_proj.weight", shape, True))
    specs.append(TensorSpec("trunk/final_norm/scale", "model.norm.weight", (d,), False))
    if not config.tie_embeddings:
        specs.append(TensorSpec("lm_head/kernel", "lm_head.weight", (d, v), True))
    return specs


# --------------------------------------------------------------------------- params <-> flat


def _path_str(path) -> str:
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def flatten_params(params) -> dict[str, jax.Array]:
    """params pytree -> {'trunk/layers/0/attn/q_proj/kernel': array, ...}."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return {_path_str(path): leaf for path, leaf in leaves}


def unflatten_params(config: ModelConfig, flat: Mapping[str, Any], *,
                     kind: api.Kind = "policy", source: str = "params"):
    """{path: array} -> (graphdef, params) of ``kind``, checking names and shapes.

    Arrays are cast to ``config.param_dtype``. Raises CheckpointError naming the
    missing/unexpected paths or the path with both shapes.
    """
    graphdef, abstract = api.abstract_init(config, kind=kind)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    wanted = {_path_str(path): leaf for path, leaf in leaves}
    missing = sorted(set(wanted) - set(flat))
    unexpected = sorted(set(flat) - set(wanted))
    if missing:
        raise CheckpointError(f"{source}: missing parameters {missing}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected parameters {unexpected}")
    dtype = jnp.dtype(config.param_dtype)
    out = []
    for path, _ in leaves:
        name = _path_str(path)
        value = flat[name]
        if tuple(value.shape) != tuple(wanted[name].shape):
            raise CheckpointError(f"{source}: parameter {name!r} has shape "
                                  f"{tuple(value.shape)}, expected {wanted[name].shape}")
        out.append(jnp.asarray(np.asarray(value), dtype=dtype))
    return graphdef, jax.tree_util.tree_unflatten(treedef, out)


# --------------------------------------------------------------------------- HF import


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _check_folder(folder: str) -> None:
    if not os.path.exists(folder):
        raise CheckpointError(f"checkpoint folder {folder!r} does not exist")
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint path {folder!r} is not a folder")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise CheckpointError(f"checkpoint folder {folder!r} has no config.json")


def _header_problem(path: str) -> tuple[str, str | None]:
    """Why ``path`` does not open as safetensors: (what is wrong, the tensor it cuts)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, too short for a safetensors header (truncated)", None
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            return (f"its header claims {n} bytes but the file has {size} (truncated, or "
                    "not a safetensors file)"), None
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "its header is not valid JSON (corrupt file)", None
    if not isinstance(header, dict):
        return "its header is not a JSON object (corrupt file)", None
    data = size - 8 - n
    cut = []
    for name, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if name == "__metadata__" or not isinstance(offsets, list) or len(offsets) != 2:
            continue
        if isinstance(offsets[1], int) and offsets[1] > data:
            cut.append((offsets[0], offsets[1], name))
    if cut:
        start, end, name = min(cut)
        more = f" (and {len(cut) - 1} more tensors)" if len(cut) > 1 else ""
        return (f"truncated: tensor {name!r}{more} needs bytes {start}..{end} of the data "
                f"section, which has {data}"), name
    return "", None


def _open_shard(path: str, stack: contextlib.ExitStack, expected: list[str]):
    """safe_open(path) in ``stack``; an unreadable file raises ShardError naming the file
    and the tensor (the one a truncation cuts, else the first ``expected`` one)."""
    try:
        return stack.enter_context(safe_open(path, framework="np"))
    except _SafetensorError as e:
        problem, tensor = _header_problem(path)
        if not problem:
            problem = f"unreadable safetensors file ({e})"
        tensor = tensor or (expected[0] if expected else None)
        held = ""
        if tensor is not None and tensor in expected:
            held = (f"; it should hold {tensor!r}"
                    + (f" and {len(expected) - 1} more tensors" if len(expected) > 1 else ""))
        raise ShardError(f"{path}: {problem}{held}; re-download or re-export this file",
                         path=path, tensor=tensor) from None


def _weight_files(folder: str, specs: list[TensorSpec], stack: contextlib.ExitStack
                  ) -> tuple[dict[str, str], dict[str, Any]]:
    """({tensor name: safetensors path}, {path: open handle}), every file opened and
    checked against what the index says it holds."""
    index = os.path.join(folder, INDEX_FILE)
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map' object")
        by_file: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or os.path.basename(fname) != fname:
                raise CheckpointError(f"{index}: tensor {name!r} maps to {fname!r}, "
                                      "expected a file name in the folder")
            by_file.setdefault(fname, []).append(name)
        handles: dict[str, Any] = {}
        for fname, names in by_file.items():
            path = os.path.join(folder, fname)
            if not os.path.isfile(path):
                raise ShardError(f"{index}: shard {fname!r} (holding {names[0]!r}) not "
                                 "found (stale index, or the shard was not downloaded)",
                                 path=path, tensor=names[0])
            handles[path] = _open_shard(path, stack, names)
        keys = {path: set(f.keys()) for path, f in handles.items()}
        files = {}
        for name, fname in weight_map.items():
            path = os.path.join(folder, fname)
            if name not in keys[path]:
                elsewhere = sorted(os.path.basename(p) for p, k in keys.items() if name in k)
                hint = f" (it is in {elsewhere[0]!r})" if elsewhere else ""
                raise ShardError(f"{index}: tensor {name!r} is listed in shard {fname!r}, "
                                 f"which does not contain it{hint}; the index is stale",
                                 path=path, tensor=name)
            files[name] = path
        return files, handles
    if os.path.isfile(single):
        f = _open_shard(single, stack, [s.hf_name for s in specs])
        return {name: single for name in f.keys()}, {single: f}
    present = sorted(os.listdir(folder))
    pickled = [p for p in present if p.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = (f"; found {pickled}: pickled checkpoints are never loaded (re-save them with "
            "safe_serialization=True)") if pickled else ""
    raise CheckpointError(f"checkpoint folder {folder!r} has neither {SINGLE_FILE} nor "
                          f"{INDEX_FILE}{hint}")


def _get_tensor(handle, path: str, name: str) -> np.ndarray:
    try:
        return handle.get_tensor(name)
    except _SafetensorError as e:
        raise ShardError(f"{path}: tensor {name!r} cannot be read ({e})", path=path,
                         tensor=name) from None


def _checked_sources(folder: str, config: ModelConfig, stack: contextlib.ExitStack
                     ) -> tuple[list[tuple[TensorSpec, Any, str]], tuple[Any, str] | None]:
    """Opens ``folder``'s weight files in ``stack`` and checks them against ``config``:
    ([(spec, open handle, file path)] in checkpoint order, (handle, path) of a duplicate
    ``lm_head.weight`` of a tied checkpoint or None). Reads headers only."""
    specs = tensor_specs(config)
    by_name = {s.hf_name: s for s in specs}
    files, handles = _weight_files(folder, specs, stack)
    missing = [s.hf_name for s in specs if s.hf_name not in files]
    if missing:
        where = os.path.join(folder, INDEX_FILE)
        if not os.path.isfile(where):
            where = os.path.join(folder, SINGLE_FILE)
        raise ShardError(f"{where}: missing tensors {missing} (needed by config.json)",
                         path=where, tensor=missing[0])
    extra = sorted(n for n in files if n not in by_name and not _IGNORED.match(n))
    tied_head = config.tie_embeddings and "lm_head.weight" in extra
    if tied_head:
        extra.remove("lm_head.weight")
    if extra:
        raise CheckpointError(f"{folder}: unexpected tensors {extra}")
    rows = []
    for spec in specs:
        path = files[spec.hf_name]
        f = handles[path]
        shape = tuple(f.get_slice(spec.hf_name).get_shape())
        if shape != spec.hf_shape:
            raise CheckpointError(
                f"{os.path.basename(path)}: tensor {spec.hf_name!r} has shape {shape}, "
                f"expected {spec.hf_shape} from config.json")
        rows.append((spec, f, path))
    tied = None
    if tied_head:
        path = files["lm_head.weight"]
        tied = (handles[path], path)
    return rows, tied


def _get_block(handle, path: str, name: str, index) -> np.ndarray:
    try:
        return handle.get_slice(name)[index]
    except _SafetensorError as e:
        raise ShardError(f"{path}: tensor {name!r} cannot be read ({e})", path=path,
                         tensor=name) from None


def _check_tied_head(folder: str, tied, embed_source, rows_per_block: int = 4096) -> None:
    """A tied checkpoint's extra ``lm_head.weight`` must equal the embedding; compared
    ``rows_per_block`` rows at a time (no full copy of either)."""
    (head, head_path), (_, embed, embed_path) = tied, embed_source
    h_shape = tuple(head.get_slice("lm_head.weight").get_shape())
    e_shape = tuple(embed.get_slice("model.embed_tokens.weight").get_shape())
    same = h_shape == e_shape
    for start in range(0, e_shape[0] if same else 0, rows_per_block):
        rows = slice(start, min(start + rows_per_block, e_shape[0]))
        a = _get_block(head, head_path, "lm_head.weight", rows)
        b = _get_block(embed, embed_path, "model.embed_tokens.weight", rows)
        if not np.array_equal(a, b):
            same = False
            break
    if not same:
        raise CheckpointError(f"{folder}: config.json has tie_word_embeddings=true but "
                              "tensor 'lm_head.weight' differs from 'model.embed_tokens.weight'")


def read_hf_tensors(folder: str, config: ModelConfig) -> dict[str, np.ndarray]:
    """Reads and checks the policy tensors of ``folder``: {rlx path: array [rlx layout]}.

    Errors are one-line CheckpointErrors naming the file and the tensor: ShardError for a
    truncated or corrupt file, a stale index (a shard that does not exist, or a tensor
    not in the shard it names) and a file lacking a tensor; CheckpointError for shape
    mismatches and unexpected tensors.
    """
    out: dict[str, np.ndarray] = {}
    with contextlib.ExitStack() as stack:
        rows, tied = _checked_sources(folder, config, stack)
        for spec, f, path in rows:
            array = _get_tensor(f, path, spec.hf_name)
            out[spec.path] = array.T if spec.transpose else array
        if tied is not None:
            _check_tied_head(folder, tied, rows[0])
    return out


def _slice_reader(spec: TensorSpec, handle, path: str, dtype):
    """The ``make_array_from_callback`` callback of one parameter: the block ``index``
    (slices in rlx layout) read from the file as [HF layout] and transposed, cast to
    ``dtype``. Devices holding the same block (replicated axes) share one read."""
    blocks: dict = {}

    def read(index):
        key = tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)
        if key not in blocks:
            block = _get_block(handle, path, spec.hf_name,
                               tuple(index[::-1]) if spec.transpose else tuple(index))
            blocks[key] = np.asarray(block.T if spec.transpose else block, dtype=dtype)
        return blocks[key]
    return read


def read_hf_sharded(folder: str, config: ModelConfig, mesh, *, rules=None):
    """(graphdef, params) of ``folder`` with every parameter read straight into its
    shards: one ``jax.make_array_from_callback`` per tensor with its ``NamedSharding``
    from ``rlx.sharding.param_shardings`` (``rules`` default to the gin-configured
    partition rules), whose callback reads only the block a device holds
    (``safe_open(...).get_slice``). No device and no host ever holds a whole sharded
    tensor; the host holds at most the local blocks of one tensor at a time (on
    multi-host runs each process reads only its addressable shards). Same checks and
    errors as ``read_hf_tensors``; arrays are cast to ``config.param_dtype``."""
    from rlx import sharding as sh

    graphdef, abstract = api.abstract_init(config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    shardings = jax.tree.leaves(sh.param_shardings(abstract, mesh, rules))
    dtype = jnp.dtype(config.param_dtype)
    out = []
    with contextlib.ExitStack() as stack:
        rows, tied = _checked_sources(folder, config, stack)
        by_path = {spec.path: (spec, f, path) for spec, f, path in rows}
        wanted = [_path_str(p) for p, _ in leaves]
        if sorted(wanted) != sorted(by_path):
            raise CheckpointError(f"{folder}: the model's parameters "
                                  f"{sorted(set(wanted) ^ set(by_path))} have no tensor map")
        for (p, leaf), sharding in zip(leaves, shardings):
            spec, f, path = by_path[_path_str(p)]
            out.append(jax.make_array_from_callback(tuple(leaf.shape), sharding,
                                                    _slice_reader(spec, f, path, dtype)))
        if tied is not None:
            _check_tied_head(folder, tied, rows[0])
    return graphdef, jax.tree_util.tree_unflatten(treedef, out)


def load_hf(folder: str, *, dtype: str | None = None,
            overrides: Mapping[str, Any] | None = None, mesh=None, rules=None):
    """Loads a Hugging Face Qwen2/Llama folder -> (ModelConfig, graphdef, params).

    Args:
      folder: holds config.json and model.safetensors (or sharded safetensors with
        model.safetensors.index.json).
      dtype: parameter storage dtype (``ModelConfig.param_dtype``); default float32.
      overrides: other ModelConfig fields, e.g. ``{"dtype": "bfloat16"}`` for the compute
        dtype or ``{"attention_backend": ...}``.
      mesh: a ``jax.sharding.Mesh``: every parameter is read straight into its shards
        (``read_hf_sharded``; partition ``rules`` default to
        ``rlx.sharding.partition_rules()``), so no device holds more than its slice.
        None: whole arrays on the default device.
    """
    folder = os.fspath(folder)
    _check_folder(folder)
    config = config_from_hf(_read_json(os.path.join(folder, "config.json")))
    changes = dict(overrides or {})
    if dtype is not None:
        changes["param_dtype"] = dtype
    if changes:
        try:
            config = config.replace(**changes)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"bad config override {changes}: {e}") from e
    if mesh is not None:
        graphdef, params = read_hf_sharded(folder, config, mesh, rules=rules)
        return config, graphdef, params
    flat = read_hf_tensors(folder, config)
    graphdef, params = unflatten_params(config, flat, source=folder)
    return config, graphdef, params


# --------------------------------------------------------------------------- HF export


def parse_size(size: int | str) -> int:
    """5_000_000, "5GB", "200MB", "20KB" -> bytes (decimal units, as transformers)."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise CheckpointError(f"shard_size={size!r}: expected bytes or e.g. '5GB'")
        unit = (m.group(2) or "B").upper()
        mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
                "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
        value = int(float(m.group(1)) * mult)
    if value <= 0:
        raise CheckpointError(f"shard_size={size!r} must be positive")
    return value


def _prepare_out(folder: str, overwrite: bool) -> None:
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CheckpointError(f"output path {folder!r} exists and is not a folder")
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        raise CheckpointError(f"output folder {folder!r} is not empty (pass overwrite=True)")
    os.makedirs(folder, exist_ok=True)


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a tokenizer ``load_tokenizer`` opens (tokenizer.json or
    one ``.model``)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return False
    names = os.listdir(folder)
    return "tokenizer.json" in names or "tokenizer.model" in names or \
        sum(n.endswith(".model") for n in names) == 1


def _export_tokenizer(tokenizer) -> tuple[Any, str | None, bytes | None]:
    """(Tokenizer, folder whose tokenizer files are copied, SentencePiece proto to write
    as tokenizer.model) for save_hf's ``tokenizer`` argument."""
    from rlx.data import tokenizer as tok_lib

    if isinstance(tokenizer, (str, os.PathLike)):
        path = os.fspath(tokenizer)
        try:
            tok = tok_lib.load_tokenizer(path)
        except ValueError as e:
            raise CheckpointError(f"tokenizer={path!r}: {e}") from e
    elif isinstance(tokenizer, tok_lib.Tokenizer):
        tok = tokenizer
    else:
        raise CheckpointError(f"tokenizer must be a folder, a tokenizer file or an rlx "
                              f"Tokenizer, got {type(tokenizer).__name__}")
    if isinstance(tok, tok_lib.HFTokenizer):
        return tok, tok.folder, None
    if isinstance(tok, tok_lib.SentencePieceTokenizer):
        return tok, None, tok.model_proto
    return tok, None, None


def _token_ids(tok, config: ModelConfig) -> dict[str, Any]:
    """bos/eos/pad ids of ``tok`` as config.json / generation_config.json keys."""
    if tok.vocab_size > config.vocab_size:
        raise CheckpointError(f"the tokenizer has {tok.vocab_size} tokens but the model's "
                              f"vocab_size is {config.vocab_size}: not this model's tokenizer")
    stop = list(tok.stop_ids)
    return {"bos_token_id": tok.bos_id,
            "eos_token_id": stop[0] if len(stop) == 1 else (stop or None),
            "pad_token_id": tok.pad_id}


def _check_ids(ids: Mapping[str, Any], vocab_size: int, source: str) -> None:
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = ids.get(key)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < vocab_size:
                raise CheckpointError(f"{source}: {key}={value!r}: expected ids in "
                                      f"[0, {vocab_size})")


def save_hf(folder: str, config: ModelConfig, params, *, dtype: str = "float32",
            shard_size: int | str = "5GB", architecture: str | None = None,
            extra_config: Mapping[str, Any] | None = None, overwrite: bool = False,
            tokenizer=None, generation: Mapping[str, Any] | None = None) -> list[str]:
    """Writes a policy as a Hugging Face folder ``transformers`` (or a serving stack) loads.

    Writes config.json and model.safetensors, or when the tensors exceed
    ``shard_size`` bytes, model-0000i-of-0000n.safetensors plus
    model.safetensors.index.json. Returns the written weight file names.

    Args:
      tokenizer: the model's tokenizer: a folder or tokenizer file (``load_tokenizer``
        paths), or an rlx ``Tokenizer``. Its files are copied next to the weights (an
        HFTokenizer's ``TOKENIZER_FILES`` and ``additional_chat_templates/``; a
        SentencePiece model as ``tokenizer.model``), and its ids go into config.json and
        generation_config.json: ``bos_token_id`` (None without bos), ``eos_token_id``
        (``tokenizer.stop_ids``: one int, or the list, e.g. Llama-3's <|end_of_text|> and
        <|eot_id|>), ``pad_token_id`` (``tokenizer.pad_id``, which falls back to eos).
        generation_config.json starts from the tokenizer folder's own, so its sampling
        defaults are kept.
      generation: keys that override generation_config.json (e.g. ``{"eos_token_id":
        [2, 7], "temperature": 0.6}``); the ids among them also go into config.json.
        With neither argument no ids and no generation_config.json are written.
      extra_config: keys that override config.json last.
    """
    folder = os.fspath(folder)
    limit = parse_size(shard_size)
    tok = source = proto = None
    gen: dict[str, Any] | None = None
    if tokenizer is not None:
        tok, source, proto = _export_tokenizer(tokenizer)
        gen = dict(getattr(tok, "generation_config", None) or {})
        gen.update(_token_ids(tok, config))
    if generation is not None:
        if not isinstance(generation, Mapping):
            raise CheckpointError(f"generation must be a mapping, got "
                                  f"{type(generation).__name__}")
        gen = {**(gen or {}), **generation}
    ids = {}
    if gen is not None:
        try:
            json.dumps(gen)
        except TypeError as e:
            raise CheckpointError(f"generation_config is not JSON-serialisable: {e}") from e
        ids = {k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in gen}
        _check_ids(ids, config.vocab_size, GENERATION_FILE)
    hf_config = config_to_hf(config, architecture=architecture, dtype=dtype,
                             extra={**ids, **(extra_config or {})})
    flat = flatten_params(params)
    specs = tensor_specs(config)
    missing = [s.path for s in specs if s.path not in flat]
    if missing:
        raise CheckpointError(f"params lack {missing} (only policy params can be exported)")
    np_dtype = _NP_DTYPES[dtype]
    tensors: dict[str, np.ndarray] = {}
    for spec in specs:
        value = np.asarray(flat[spec.path])
        if value.shape != spec.shape:
            raise CheckpointError(f"parameter {spec.path!r} has shape {value.shape}, "
                                  f"expected {spec.shape} from the config")
        value = value.T if spec.transpose else value
        tensors[spec.hf_name] = np.ascontiguousarray(value.astype(np_dtype))

    shards: list[dict[str, np.ndarray]] = [{}]
    used = 0
    for name, value in tensors.items():
        if shards[-1] and used + value.nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][name] = value
        used += value.nbytes

    _prepare_out(folder, overwrite)
    if source is not None and os.path.samefile(source, folder):
        source = None  # exporting into the tokenizer's own folder: its files stay
        tok = None
    stale = [SINGLE_FILE, INDEX_FILE]
    if gen is not None:
        stale.append(GENERATION_FILE)
    if tok is not None:
        stale.extend(TOKENIZER_FILES)
        if os.path.isdir(os.path.join(folder, CHAT_TEMPLATE_DIR)):
            shutil.rmtree(os.path.join(folder, CHAT_TEMPLATE_DIR))
    for name in stale:
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    metadata = {"format": "pt"}
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                 for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(folder, name), metadata=metadata)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
                 "weight_map": {t: name for name, shard in zip(names, shards) for t in shard}}
        with open(os.path.join(folder, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if source is not None:
        copy_tokenizer_files(source, folder, generation=False)
    if proto is not None:
        with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
            f.write(proto)
    if gen is not None:
        with open(os.path.join(folder, GENERATION_FILE), "w") as f:
            json.dump(gen, f, indent=2)
    return names


def copy_tokenizer_files(src: str, dst: str, *, generation: bool = True) -> list[str]:
    """Copies tokenizer/generation files (``TOKENIZER_FILES`` and an
    ``additional_chat_templates/`` folder) present in ``src``; ``generation=False`` leaves
    generation_config.json out. Returns the copied names."""
    copied = []
    for name in TOKENIZER_FILES:
        if name == GENERATION_FILE and not generation:
            continue
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(dst, name))
            copied.append(name)
    templates = os.path.join(src, CHAT_TEMPLATE_DIR)
    if os.path.isdir(templates):
        shutil.copytree(templates, os.path.join(dst, CHAT_TEMPLATE_DIR), dirs_exist_ok=True)
        copied.append(CHAT_TEMPLATE_DIR)
    return copied


# --------------------------------------------------------------------------- rlx format


def save_rlx(folder: str, config: ModelConfig, params, *, kind: api.Kind = "policy",
             overwrite: bool = False) -> None:
    """Writes rlx's pickle-free folder: config.json + params.safetensors (flat paths)."""
    folder = os.fspath(folder)
    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten_params(params).items()}
    _prepare_out(folder, overwrite)
    save_file(flat, os.path.join(folder, RLX_PARAMS_FILE), metadata={"format": "rlx"})
    meta = {"rlx_format": RLX_FORMAT, "kind": kind,
            "model_config": dataclasses.asdict(config)}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(meta, f, indent=2)


def load_rlx(folder: str, *, dtype: str | None = None):
    """Reads a folder written by ``save_rlx`` -> (ModelConfig, graphdef, params)."""
    folder = os.fspath(folder)
    _check_folder(folder)
    meta = _read_json(os.path.join(folder, "config.json"))
    if meta.get("rlx_format") != RLX_FORMAT:
        hint = (" (it looks like a Hugging Face folder: use hf-to-rlx / load_hf)"
                if "architectures" in meta else "")
        raise CheckpointError(f"{folder}/config.json is not an rlx checkpoint config "
                              f"(rlx_format={meta.get('rlx_format')!r}){hint}")
    try:
        config = ModelConfig(**meta["model_config"])
        if dtype is not None:
            config = config.replace(param_dtype=dtype)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}/config.json: bad model_config ({e})") from e
    path = os.path.join(folder, RLX_PARAMS_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"rlx checkpoint folder {folder!r} has no {RLX_PARAMS_FILE}")
    with contextlib.ExitStack() as stack:
        f = _open_shard(path, stack, [])
        flat = {name: _get_tensor(f, path, name) for name in f.keys()}
    kind = meta.get("kind", "policy")
    if kind not in ("policy", "value", "reward"):
        raise CheckpointError(f"{folder}/config.json: unknown kind {kind!r}")
    graphdef, params = unflatten_params(config, flat, kind=kind, source=path)
    return config, graphdef, params
