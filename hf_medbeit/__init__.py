"""hf_medbeit: fine-tune BEiT and any Hugging Face image classifier on MedMNIST.

Data flows one way: data -> transforms -> modeling -> training -> metrics -> outputs (-> cards -> hub).
"""

__version__ = "0.1.0"
