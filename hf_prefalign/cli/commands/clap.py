"""`hf-prefalign clap`: train a PrefAlign backbone with CLaP on a response pool; its architecture flags are
`PrefAlignConfig`'s fields."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hf_prefalign.cli import common
from hf_prefalign.cli.common import UsageError


@dataclass
class ClapArguments:
    pool: str = field(metadata={"help": "A response pool folder (from `hf-prefalign pool`)."})
    model: str = field(
        default="embedded",
        metadata={"help": "'embedded' or a base causal LM path/id.", "aliases": ["--model_name_or_path"]},
    )
    backbone_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the trained backbone and its tokenizer are saved (default: <output_dir>/backbone). "
            "--output_dir is the Trainer's: checkpoints and --resume_from_checkpoint true stay there."
        },
    )
    eval_fraction: float = field(default=0.0, metadata={"help": "Fraction of the pool's prompts held out for eval."})
    posterior_refinement_steps: int = field(
        default=0,
        metadata={"help": "Gradient steps on the posterior mean when the trained backbone encodes (PrefAlignConfig)."},
    )
    posterior_refinement_step_size: float = field(default=3.0, metadata={"help": "Length of each refinement step."})
    dtype: str = common._dtype_field("the frozen base")
    # The backbone's architecture (PrefAlignConfig's fields); unset keeps the config's default, the default recipe.
    latent_dim: int | None = field(
        default=None, metadata={"help": "Size of the latent z; unset: PrefAlignConfig's 32."}
    )
    encoder_type: str | None = field(
        default=None,
        metadata={
            "help": "'hidden_states' (a head over the base's mid-layer residual stream) or 'blocks' (the paper's "
            "encoder blocks); unset: PrefAlignConfig's 'hidden_states'."
        },
    )
    encoder_layer: int | None = field(
        default=None, metadata={"help": "Decoder layer the hidden-state encoder reads; unset: the base's middle one."}
    )
    adapter_type: str | None = field(
        default=None,
        metadata={
            "help": "'residual' (W z added to the residual stream) or 'prefix' (the paper's key/value prefix); "
            "unset: PrefAlignConfig's 'residual'."
        },
    )
    steering_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Decoder layers the residual adapter acts on; unset: PrefAlignConfig's 'auto' (the encoder "
            "layer and a quarter of the depth either side)."
        },
    )
    num_prefix_slots: int | None = field(
        default=None,
        metadata={"help": "Key/value slots per layer of the 'prefix' adapter; unset: PrefAlignConfig's 4."},
    )
    num_encoder_layers: int | None = field(
        default=None,
        metadata={
            "help": "Blocks of the 'blocks' encoder, copied from the base's first ones; unset: PrefAlignConfig's 2."
        },
    )
    num_encoder_queries: int | None = field(
        default=None, metadata={"help": "Learned queries of the 'blocks' encoder; unset: PrefAlignConfig's 4."}
    )

    def __post_init__(self):
        common._check_dtype(self.dtype)
        _check_architecture(self.architecture())  # what needs no base model, before anything loads

    def architecture(self) -> dict:
        """The architecture flags that were given, as `PrefAlignForCausalLM.from_base` latent options."""
        return {name: getattr(self, name) for name in _ARCHITECTURE_FIELDS if getattr(self, name) is not None}


_ARCHITECTURE_FIELDS = (
    "latent_dim",
    "encoder_type",
    "encoder_layer",
    "adapter_type",
    "steering_layers",
    "num_prefix_slots",
    "num_encoder_layers",
    "num_encoder_queries",
)


def _check_architecture(options: dict, text_config=None) -> None:
    """Build the `PrefAlignConfig` the architecture flags describe; its `ValueError` is a usage error (exit 2)."""
    from hf_prefalign import PrefAlignConfig

    try:
        PrefAlignConfig(text_config=text_config, **options)
    except ValueError as err:
        message = str(err)
        for name in options:  # the config names its fields (`latent_dim`, `num_encoder_layers=3`): name the flags
            message = re.sub(rf"`{name}(=[^`]*)?`", lambda match, name=name: f"--{name}{match[1] or ''}", message)
        raise UsageError(message) from None


def _arguments() -> tuple[type, ...]:
    """`clap`'s flags: `ClapArguments` and `CLaPConfig` (which imports torch: only when asked)."""
    from hf_prefalign import CLaPConfig

    return (ClapArguments, CLaPConfig)


def _clap(argv: list[str]) -> int:
    import copy

    from hf_prefalign import CLaPTrainer, PrefAlignForCausalLM, load_response_pool

    args, config = common._parse("clap", _arguments(), argv)
    common._resume(config)
    pool = load_response_pool(args.pool)
    eval_pool = None
    if args.eval_fraction > 0:
        split = pool.train_test_split(test_size=args.eval_fraction, seed=config.seed)
        pool, eval_pool = split["train"], split["test"]
    # The Trainer moves the model to its device; bf16 is resolved for that device here.
    base, tokenizer = common._load_base(args.model, args.dtype, common._device(config.use_cpu))
    architecture = args.architecture()
    _check_architecture(architecture, text_config=copy.deepcopy(base.config))  # layer indices vs the base's depth
    model = PrefAlignForCausalLM.from_base(base, tokenizer=tokenizer, **architecture)
    trainer = CLaPTrainer(
        model=model, args=config, train_dataset=pool, eval_dataset=eval_pool, processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    # Refinement is how the trained backbone encodes (caches, evaluation), as measured in docs/clap.md.
    model.config.posterior_refinement_steps = args.posterior_refinement_steps
    model.config.posterior_refinement_step_size = args.posterior_refinement_step_size
    if eval_pool is not None:
        trainer.evaluate()
    # The backbone gets a folder of its own: the Trainer's checkpoints (optimizer states, RNG states, pickled
    # training arguments) stay in --output_dir, so the backbone folder can be pushed or shared as it is.
    backbone_dir = Path(args.backbone_dir or Path(config.output_dir) / "backbone")
    if trainer.args.should_save:  # under `accelerate launch` / `torchrun`, the main process writes
        model.save_pretrained(backbone_dir, with_tokenizer=True)
        tokenizer.save_pretrained(backbone_dir)
        print(f"saved the backbone to {backbone_dir} (checkpoints, if any, in {config.output_dir})")
    trainer.accelerator.wait_for_everyone()
    return 0
