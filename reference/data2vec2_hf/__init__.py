"""data2vec 2.0 vision as transformers custom code (loaded with trust_remote_code=True).

The two modules here are self-contained (they import only torch and
transformers) because a converted folder ships them next to config.json.
"""

from .configuration_data2vec2 import Data2Vec2VisionConfig
from .modeling_data2vec2 import Data2Vec2VisionForImageClassification, Data2Vec2VisionModel

__all__ = ["Data2Vec2VisionConfig", "Data2Vec2VisionModel", "Data2Vec2VisionForImageClassification"]
