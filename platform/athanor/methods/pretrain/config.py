"""The pretrain paper's typed config: defaults are the tiny CPU run. The class itself sits one floor
down (``athanor.parts.gpt``), since the stability paper checks its sweep points against it too."""
from ...parts.gpt import PretrainConfig

__all__ = ["PretrainConfig"]
