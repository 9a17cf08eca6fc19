"""The model: configuration, the ViT, BERT text encoder, skip-connected fusion, decoder, beam search and the authors'
checkpoint layout (``MPLUG`` in ``mplug.model.mplug``)."""
