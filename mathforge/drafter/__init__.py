"""ReDrafter (Apple's recurrent drafter): the model, its training and its on-disk layout."""
