"""The quickstart as a Python script: the same run as `hf-prefalign quickstart` (see docs/cli.md).

python examples/quickstart.py --output_dir prefalign-quickstart [--fast]
"""

from transformers import HfArgumentParser

from hf_prefalign.quickstart import QuickstartConfig, run_quickstart


if __name__ == "__main__":
    (config,) = HfArgumentParser(QuickstartConfig).parse_args_into_dataclasses()
    run_quickstart(config)
