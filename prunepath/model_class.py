"""Which transformers class a checkpoint is loaded as: the one its weights fill.

`AutoModelForCausalLM` on an encoder checkpoint (BERT saved without its MLM head) quietly adds a randomly
initialised LM head; a bare `AutoModel` on a checkpoint that has a head drops it. Neither is what the
checkpoint holds. So `load_matching_class` tries, in order,

  1. the classes the checkpoint names in `config.architectures` (what `save_pretrained` wrote);
  2. without that: the causal LM class (decoders), the seq2seq LM class (encoder-decoders);
  3. the bare backbone (`AutoModel`),

and keeps the first that loads with no missing weights. If even the backbone misses some (a BERT pooler
that the checkpoint never had), it is used, the randomly initialised parameters are named in a warning and
recorded in `model.prunepath_untrained`, and `models.model_fingerprint` leaves them out: a fingerprint must
not depend on a random draw.
"""

from __future__ import annotations

import warnings

import torch


def candidate_classes(config) -> list[type]:
    """Model classes to try for `config`, best first (see the module docstring)."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    named = [getattr(transformers, a, None) for a in (getattr(config, "architectures", None) or ())]
    out = [c for c in named if isinstance(c, type)]
    if not out:
        if getattr(config, "is_encoder_decoder", False):
            if config.model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
                out.append(AutoModelForSeq2SeqLM)
        elif config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            out.append(AutoModelForCausalLM)
    out.append(AutoModel)
    return out


def load_matching_class(source, config, dtype: torch.dtype, **kwargs):
    """`from_pretrained(source)` as the first candidate class that leaves no weight randomly initialised.

    kwargs go to every `from_pretrained` (gguf_file, local_files_only, ...). Returns the model; its
    `prunepath_untrained` lists the parameters the checkpoint did not provide (usually none).
    """
    classes = candidate_classes(config)
    tried = []
    for cls in classes:
        try:
            model, info = cls.from_pretrained(source, config=config, dtype=dtype, output_loading_info=True, **kwargs)
        except ValueError as e:  # e.g. an Auto class with no entry for this model type
            tried.append(f"{cls.__name__}: {' '.join(str(e).split())[:120]}")
            continue
        missing = sorted(info.get("missing_keys") or ())
        if not missing or cls is classes[-1]:
            break
        tried.append(f"{type(model).__name__} would initialise {len(missing)} weight(s) at random ({missing[0]}, ...)")
    else:
        raise ValueError(f"no transformers class loads {source}: " + "; ".join(tried) + ". Fix: pass a model of "
                         "an architecture this transformers version knows (or upgrade transformers)")
    if missing:
        warnings.warn(
            f"{source} lacks {len(missing)} weight(s) of {type(model).__name__} even as the bare backbone "
            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); they are randomly initialised and "
            f"left out of the model's fingerprint. Classes tried first: {'; '.join(tried) or 'none'}",
            stacklevel=3,
        )
    # A plain attribute, not a config field: it describes this load, not the checkpoint.
    model.prunepath_untrained = tuple(missing)
    return model
