"""The floor below the papers: what two or more papers share, so that no paper imports another.

- ``diffusion``: class-conditional EDM teachers (diffusers DiT/UNet), their training Method and
  stage, Euler samplers and the saved ``EDMClassPipeline`` (DMD2, ILF);
- ``fd``: Fréchet distance on a small feature classifier's features (DMD2, ILF);
- ``lm``: causal-LM helpers: a target LM built from config, teacher-forced answer scoring, QA
  encoding, the decoder's block list (O3, SeND, codebook);
- ``fact_world``: the synthetic world of fictitious facts and QA datasets (O3, SeND);
- ``gpt``: athanor's GPT as a config section, its probe schedule and the config of one
  pretraining run (pretrain, stability);
- ``classifier``: small blocks any paper may use instead of writing its own: an ``MLP`` that saves
  and loads itself (Hub mixin) and a ``Classifier`` method (cross-entropy, held-out accuracy, an
  overridable ``loss``), with its ``MLPConfig`` section.
"""
