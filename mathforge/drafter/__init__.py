"""ReDrafter (Apple's recurrent drafter): the model (`model`), its training data (`data`), its training on a
frozen base (`train`) and the `mathforge drafter` command (`cli`)."""
