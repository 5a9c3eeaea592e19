"""What every tiny model is made from: the text its tokenizers train on and the seed its weights start from."""

# A few hundred words of varied English, so trained tokenizers have a real vocabulary and
# tests can send ordinary sentences without every word falling back to unknown tokens.
CORPUS = """
The quick brown fox jumps over the lazy dog. A serverless worker loads its model once and then
answers many jobs. Cats and dogs are popular pets; people love them. The weather today is sunny
with a light breeze, and tomorrow it may rain. Paris is the capital of France, Berlin is the
capital of Germany, and Tokyo is the capital of Japan. Machine learning models turn text into
vectors, and similar sentences get similar vectors. A GPU makes inference fast. Stock markets
rose after the central bank held interest rates. The recipe needs flour, sugar, eggs and butter.
Football fans cheered as their team scored in the final minute. Please summarise this document in
three sentences. What is the meaning of life? How do I reset my password? The train to London
leaves at nine o'clock. Photosynthesis converts sunlight, water and carbon dioxide into sugar.
Write a short poem about the sea. Translate hello into Spanish: hola. Numbers: 0 1 2 3 4 5 6 7 8 9.
Café, naïve, jalapeño, 東京, Здравствуйте, 😀 — unicode text must survive every step.
""".strip()

SEED = 0
