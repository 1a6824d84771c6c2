"""Configuration of the data2vec 2.0 vision classifier (transformers custom code)."""

from transformers import PretrainedConfig


class Data2Vec2VisionConfig(PretrainedConfig):
    """Hyper-parameters of a data2vec 2.0 image model (fairseq `data2vec_multi`).

    `num_hidden_layers` counts every block: the `num_prenet_layers` blocks of
    fairseq's `context_encoder` come first, then the shared blocks; the split
    changes no math and is kept so the original names can be told back.
    `layer_norm_first=False` (post-norm, LayerNorm on the embeddings) is what
    every released image model uses. Both epsilons are 1e-6 in the original:
    `layer_norm_eps` is `norm_eps`, `pooler_layer_norm_eps` is the hard-coded
    eps of `fc_norm`. `use_mean_pooling=False` is the pretrained encoder:
    `Data2Vec2VisionModel` then has no pooler (fairseq's `Data2VecMultiModel`
    ends at the last block, or at `norm` in pre-norm models).
    """

    model_type = "data2vec2-vision"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_prenet_layers: int = 2,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        layer_norm_first: bool = False,
        layer_norm_eps: float = 1e-6,
        pooler_layer_norm_eps: float = 1e-6,
        hidden_act: str = "gelu",
        use_mean_pooling: bool = True,
        initializer_range: float = 0.02,
        **kwargs,
    ) -> None:
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_prenet_layers = num_prenet_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.layer_norm_first = layer_norm_first
        self.layer_norm_eps = layer_norm_eps
        self.pooler_layer_norm_eps = pooler_layer_norm_eps
        self.hidden_act = hidden_act
        self.use_mean_pooling = use_mean_pooling
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
