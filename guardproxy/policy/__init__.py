"""The policy language: YAML in, frozen typed ``Policy`` out (see ``load_policy``)."""
