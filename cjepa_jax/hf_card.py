"""The model card (README.md) that `cjepa-export` writes beside an exported encoder.

What the encoder is (variant, objective, data, steps: from the checkpoint's saved config and
`extra`), how to load it in `transformers`, and, when the checkpoint was probed, the probe
results as a table with their protocol (`hf.find_probe_results` finds them; each evaluator's
rows and protocol clause are its type's, evals/registry.py `result_types`).
"""

from __future__ import annotations

from collections.abc import Mapping
import datetime
from typing import Any

import ml_collections

from cjepa_jax import optim
from cjepa_jax.evals import registry
from cjepa_jax.evals import units
from cjepa_jax.models import vit


def _probe_section(results: Mapping[str, Any]) -> list[str]:
  """The model card's evaluation table (percent) and protocol, from probe_results.json (any
  version: older files hold fractions); each evaluator's rows and protocol clause are its type's
  (`base.Type.card_rows`, `.card_protocol`)."""
  results = units.read_probe_results(dict(results))
  types = registry.result_types(results)
  rows = [row for name, type_ in types.items() if type_.card_rows
          for row in type_.card_rows(name, results[name])]
  lines = ['| evaluator | features | top-1 % | top-5 % | notes |',
           '| --- | --- | --- | --- | --- |']
  lines += [f'| {" | ".join(str(c) for c in row)} |' for row in rows]
  how = dict.fromkeys(t.card_protocol for t in types.values() if t.card_protocol)
  protocol = (
      f'Protocol (`cjepa-probe`, frozen {results.get("encoder") or "target"} encoder, step '
      f'{results.get("step")}): {results.get("dataset")} `{results.get("train_split")}` '
      f'({results.get("num_train")} images) -> `{results.get("eval_split")}` '
      f'({results.get("num_test")} images) at {results.get("image_size")} px, centre crop. '
      "Features: 'last' = the average-pooled final tokens, 'last4' = the last 4 blocks' tokens "
      'through the final LayerNorm, pooled and concatenated, the kind chosen on a held-out part '
      'of the train split (never on the test split); '
      + '; '.join(how) + '.')
  if results.get('complete') is False:
    protocol += ' The probe run was not complete: only the evaluators above had finished.'
  return lines + ['', protocol]


def _objective_name(cfg: Mapping[str, Any], extra: Mapping[str, Any] | None,
                    info: Mapping[str, Any]) -> str:
  """'I-JEPA', 'C-JEPA', 'SIGReg' or 'Converted' (weights not trained by cjepa_jax)."""
  if (extra and extra.get('source')) or int(info['step']) == 0:
    return 'Converted'
  if float(cfg.get('vicreg', {}).get('weight', 0)) > 0:
    return 'C-JEPA'
  return 'SIGReg' if float(cfg.get('sigreg', {}).get('weight', 0)) > 0 else 'I-JEPA'


def _objective(cfg: Mapping[str, Any]) -> str:
  vicreg, sigreg = cfg.get('vicreg', {}), cfg.get('sigreg', {})
  loss = cfg.get('loss', {}).get('kind', 'smooth_l1')
  name = f'I-JEPA (predict the EMA target encoder\'s features of 4 target blocks, {loss} loss)'
  if float(vicreg.get('weight', 0)) > 0:
    mode = vicreg.get('mode')
    where = ('on the pooled context-encoder features' if mode == 'context'
             else 'between the projected target-block predictions')
    name = (f'C-JEPA: I-JEPA + VICReg (weight {vicreg["weight"]:g}, sim / std / cov '
            f'{vicreg.get("sim_coeff"):g} / {vicreg.get("std_coeff"):g} / '
            f'{vicreg.get("cov_coeff"):g}) {where} (vicreg.mode={mode!r})')
  if float(sigreg.get('weight', 0)) > 0:
    name += f' + SIGReg (LeJEPA, weight {sigreg["weight"]:g}) on the pooled context features'
  if cfg.get('use_ema', True) is False:
    name += '; no EMA teacher (targets from the online encoder under stop-gradient)'
  return name


def model_card(saved: Mapping[str, Any], info: Mapping[str, Any],
               probe: Mapping[str, Any] | None, extra: Mapping[str, Any] | None = None) -> str:
  """The README.md of an exported folder, generated from the run.

  Args:
    saved: the checkpoint's saved config (a dict, `checkpoint.load_config`).
    info: checkpoint (step dir), step, encoder ('target' | 'context'), variant, depth,
      image_size.
    probe: that checkpoint's probe_results.json (fractions, or percent with "unit": "percent"),
      or None.
    extra: the checkpoint's saved `extra` dict; `source` names where converted weights came from.
  Returns:
    Markdown with a YAML header (library_name, pipeline_tag, tags) for the hub.
  """
  spec, patch = vit.parse_variant(info['variant'])
  depth = info['depth'] or spec['depth']
  width = spec['width']
  size = info['image_size']
  data, model, opt = saved.get('data', {}), saved.get('model', {}), saved.get('optim', {})
  arch = (f'ViT-{info["variant"]} ({depth} blocks, width {width}, {spec["num_heads"]} heads, '
          f'{size} px: {(size // patch) ** 2} patch tokens, no class token)')
  which = ('EMA target encoder (`target_params`, the one I-JEPA evaluates)'
           if info['encoder'] == 'target' else 'context encoder (`params/encoder`)')
  title = f'{_objective_name(saved, extra, info)} ViT-{info["variant"]} encoder (cjepa_jax)'
  lines = ['---', 'library_name: transformers', 'pipeline_tag: image-feature-extraction',
           'tags:', '- ijepa', '- self-supervised-learning', '- cjepa_jax', '- jax', '---', '',
           f'# {title}', '',
           f'The {which} of `{info["checkpoint"]}` (step {info["step"]}), a {arch}, as a '
           '`transformers` `IJepaModel`. Its position embeddings are the fixed 2-D sin-cos '
           'values of the training grid; the model has no pooler: average the tokens.', '',
           '## Use', '', '```python',
           'from transformers import AutoImageProcessor, IJepaModel',
           'processor, model = AutoImageProcessor.from_pretrained(PATH), '
           'IJepaModel.from_pretrained(PATH)',
           "features = model(**processor(images, return_tensors='pt')).last_hidden_state"
           '.mean(1)  # [B, D]', '```', '',
           f'`preprocessor_config.json` resizes to {size} x {size} and normalises with mean '
           f'{list(data.get("mean", []))} / std {list(data.get("std", []))}, as in training '
           "(cjepa_jax's probes resize the short side to "
           f'{round(data.get("eval_resize", 256) * size / 224)} and centre-crop instead).', '']
  if (extra and extra.get('source')) or int(info['step']) == 0:
    source = (extra or {}).get('source') or 'elsewhere, or an initialisation (step 0)'
    lines += ['## Origin', '',
              f'Not pretrained by cjepa_jax: converted from {source}. The settings of the run '
              'that trained these weights are not recorded here.', '']
  else:
    step = int(info['step'])
    batch = saved.get('batch_size')
    try:
      run = optim.RunLength.from_config(ml_collections.ConfigDict(dict(saved)))
      total, per_epoch = run.total_steps, run.steps_per_epoch
      length = (f'step {step} of {total}: {step / per_epoch:.2f} epochs of batch {batch} '
                f'({per_epoch} steps per epoch)')
    except (AttributeError, KeyError, TypeError, ValueError):   # No run length: the step alone.
      length = f'step {step} of batch {batch}'
    ema = opt.get('ema', saved.get('ema'))
    lines += [
        '## Pretraining', '',
        '| | |', '| --- | --- |',
        f'| objective | {_objective(saved)} |',
        f'| data | {data.get("dataset")} `{data.get("train_split")}` '
        f'({data.get("num_train_examples")} images per epoch), {size} px random resized crops '
        f'(scale {list(data.get("crop_scale", []))}) |',
        f'| length | {length} |',
        f'| optimizer | AdamW, lr {opt.get("start_lr")} -> {opt.get("lr")} (warm-up) -> '
        f'{opt.get("final_lr")} (cosine), weight decay {opt.get("weight_decay")} -> '
        f'{opt.get("final_weight_decay")} |',
        f'| EMA momentum | {list(ema) if ema is not None else None} |'
        if saved.get('use_ema', True) else '| EMA | none |',
        f'| masks | {saved.get("mask", {}).get("npred")} target blocks of scale '
        f'{list(saved.get("mask", {}).get("pred_scale", []))}, one context block of scale '
        f'{list(saved.get("mask", {}).get("enc_scale", []))} |',
        f'| predictor | depth {model.get("pred_depth")}, width {model.get("pred_width")} '
        '(not exported) |',
        f'| compute | {model.get("dtype")} (weights stored float32), seed {saved.get("seed")} |',
        '']
  lines += ['## Evaluation', '']
  if probe:
    lines += _probe_section(probe)
  else:
    lines += ['No `probe_results.json` of this checkpoint was found beside it; run '
              '`cjepa-probe` on it and export again to list its probe accuracies here.']
  lines += ['', f'Exported by `cjepa-export` on {datetime.date.today().isoformat()}.', '']
  return '\n'.join(lines)
