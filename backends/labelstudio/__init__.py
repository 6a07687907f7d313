"""The Label Studio ML backend: an HTTP app speaking Label Studio's ML protocol."""
