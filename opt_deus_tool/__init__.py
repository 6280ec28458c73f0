"""The tool around the reference: what a reader of model.py, sinkhorn.py, opt_deus.py and train.py does not come for.

    hf_config.py    config.json <-> model.ModelArgs, strictly, per family (llama, qwen2, qwen3, mistral)
    checkpoint.py   Hugging Face folders read and written one tensor at a time; load_pretrained, save_pretrained
    atomic.py       output folders and files written whole or not at all
    inputs.py       reading what users hand us: hostile JSON, FIFOs and devices where files belong
    gguf.py         a GGUF file (llama, qwen2) converted into a Hugging Face folder: the tests' real checkpoints
    data.py         tokenizers, data files, the token cache, Alpaca-style SFT examples
    devices.py      the device a command runs on ("auto", cuda:N, ...), refused in one line if absent
    hub.py          Hugging Face Hub ids (ORG/NAME[@REVISION]) where a model folder is taken, through the HF cache
    model_card.py   README.md model cards of grown folders and training checkpoints
    progress.py     what training says before and at its first step, and the moment a stop signal arrives
    train_checks.py a training request checked where it enters (config values, data, trainable layers)
    runs.py         training run folders: checkpoints, metrics.jsonl, resume state (checked), stopping on signals
    distributed.py  torchrun: FSDP2 behind train.py's OneProcess seam (sharding, gathering, agreeing ranks)
    hardware.py     the CPU's name, for benchmark records
    cli.py          what the commands share: one-line errors, flags generated from dataclass fields
    grow_cli.py     opt-deus: streaming growth of a Hugging Face folder (grow_checkpoint)
    train_cli.py    opt-deus-train: a training run from the command line (run_training)
    eval_cli.py     opt-deus-eval: perplexity of a folder on a text file (evaluate_text)
    cloze.py        the local multiple-choice cloze task (tasks/, package data) and our scorer
    lm_eval_cli.py  opt-deus-lm-eval: lm-evaluation-harness on a folder, offline, with the local task

Imports go from here to the reference files, never back.
"""


class CheckpointError(ValueError):
    """A checkpoint, config or output folder we refuse; the message names the file or key."""


class DataError(ValueError):
    """Data, tokenizer or token cache we refuse (opt_deus_tool/data.py); the message names the file."""
