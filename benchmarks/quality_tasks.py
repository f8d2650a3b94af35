"""The quality benchmark's tasks: one training datapoint each, held-out test prompts written for this
benchmark, 16 contrastive pairs (for CAA from 16 pairs), a success scorer and a prompting baseline.

Nothing here was tuned on the test prompts: hyper-parameters are chosen on the library's built-in
generic validation prompts (``steering_opt.sweep.GENERIC_PROMPTS`` / ``GENERIC_CHAT_PROMPTS``), which
share no prompt with these lists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from steering_opt.data import TrainingDatapoint
from steering_opt.passes import format_prompt
from steering_opt.scorers import KeywordScorer, LanguageScorer, RefusalScorer, SentimentScorer

TUTORIAL_PROMPT = (
    "Some of my fondest childhood memories are from my summer vacations back when I was little. Every now and "
    "then, after a long day of playing outside, I would come back home to be greeted with the delicious smell of "
    "my grandma's hazelnut cake wafting out of the kitchen. In this recipe, I'll teach you how to make that very "
    "cake, and create your own summer memories.\n\n"
)


@dataclasses.dataclass
class Task:
    """One benchmark task (see the module docstring)."""

    name: str
    chat: bool  # prompts are user messages (chat template) rather than plain text to continue
    prompt: str  # the training prompt (a user message when chat=True)
    src: str  # the suppressed completion
    dst: str  # the promoted completion
    test_prompts: list[str]
    pairs: list[tuple[str, str, str]]  # (prompt, promoted completion, suppressed completion): CAA from 16 pairs
    scorer: Callable[..., float]
    lang: str  # language of the fluent text (real-word check)
    instruction: str  # prompting baseline: prepended (plain) or a system message (chat)
    notes: str = ""
    # ceiling: the unsteered model with the behaviour induced directly. Either the test prompts in the target
    # language (ceiling_prompts, same order) or the prompting baseline's instruction plus forced first words
    # (ceiling_prefix, written by the model's side; scored as part of its text).
    ceiling_prefix: str = ""
    ceiling_prompts: list[str] | None = None

    def prompt_with_instruction(self, prompt: str) -> Any:
        if self.chat:
            return [{"role": "system", "content": self.instruction}, {"role": "user", "content": prompt}]
        return f"{self.instruction}\n\n{prompt}"

    def datapoint(self, tokenizer: Any) -> TrainingDatapoint:
        """The task's one training datapoint: its prompt (chat-formatted for chat tasks), ``src`` suppressed,
        ``dst`` promoted."""
        return TrainingDatapoint(format_prompt(tokenizer, self.prompt, chat=self.chat), src_completions=[self.src],
                                 dst_completions=[self.dst])

    def ceiling_inputs(self, n: int) -> list[tuple[Any, str]]:
        """The first ``n`` ceiling inputs: ``(prompt, forced first words)``."""
        if self.ceiling_prompts is not None:
            return [(p, "") for p in self.ceiling_prompts[:n]]
        return [(self.prompt_with_instruction(p), self.ceiling_prefix) for p in self.test_prompts[:n]]


SPANISH = Task(
    name="english_to_spanish",
    chat=False,
    prompt=TUTORIAL_PROMPT,
    src="<h2>Ingredients</h2>\n\n* 1 cup of all-purpose flour",
    dst="<h2>Ingredientes</h2>\n\n* 1 taza de harina común",
    test_prompts=[
        "My favourite season of the year is",
        "When I was a child, my father used to",
        "The most important thing about friendship is",
        "Last summer we travelled to the mountains and",
        "To cook rice properly, you need to",
        "The city where I live is famous for",
        "Every morning before work, I",
        "My best friend has a dog that",
        "The library in our town has",
        "I think that learning to play the piano is",
        "Our teacher told us a story about",
        "The market on Saturday was full of",
        "After dinner, my family likes to",
        "The old house at the end of the street",
        "My grandmother always said that",
        "On rainy days, the children",
        "The new bakery next to the park sells",
        "When we arrived at the beach,",
        "My brother works in a hospital where",
        "The football match last night was",
        "I would like to visit",
        "Yesterday afternoon, my sister and I",
        "The best way to spend a Sunday is",
        "In the garden behind our house there are",
    ],
    pairs=[(p, es, en) for p, en, es in [
        ("Write about your day.", " Today I went to the market and bought fruit.",
         " Hoy fui al mercado y compré fruta."),
        ("Describe the weather.", " It is sunny and warm this afternoon.", " Hace sol y calor esta tarde."),
        ("Talk about your family.", " My mother is a teacher and my father is a doctor.",
         " Mi madre es profesora y mi padre es médico."),
        ("Describe your house.", " Our house has a small garden and a red door.",
         " Nuestra casa tiene un jardín pequeño y una puerta roja."),
        ("What do you eat for breakfast?", " I usually eat bread with butter and drink coffee.",
         " Normalmente como pan con mantequilla y bebo café."),
        ("Talk about a trip.", " Last year we travelled to the coast by train.",
         " El año pasado viajamos a la costa en tren."),
        ("Describe your city.", " The city is big and has many old churches.",
         " La ciudad es grande y tiene muchas iglesias antiguas."),
        ("What are your hobbies?", " I like reading books and playing the guitar.",
         " Me gusta leer libros y tocar la guitarra."),
        ("Tell me about your friend.", " My friend is very funny and always helps me.",
         " Mi amigo es muy divertido y siempre me ayuda."),
        ("Describe a meal.", " The soup was hot and the bread was fresh.",
         " La sopa estaba caliente y el pan estaba fresco."),
        ("Talk about school.", " At school we study history, science and music.",
         " En la escuela estudiamos historia, ciencias y música."),
        ("Describe an animal.", " The cat sleeps all day next to the window.",
         " El gato duerme todo el día junto a la ventana."),
        ("What did you do yesterday?", " Yesterday I cleaned my room and called my grandmother.",
         " Ayer limpié mi habitación y llamé a mi abuela."),
        ("Describe the sea.", " The sea is blue and the waves are very big.",
         " El mar es azul y las olas son muy grandes."),
        ("Talk about work.", " I work in an office from nine to five.",
         " Trabajo en una oficina de nueve a cinco."),
        ("Describe a party.", " We danced, sang and ate cake until midnight.",
         " Bailamos, cantamos y comimos pastel hasta la medianoche."),
    ]],
    scorer=LanguageScorer("es"),
    lang="es",
    instruction="The following text is written in Spanish (en español).",
    ceiling_prompts=[  # the test prompts in Spanish: the model continues in the target language by itself
        "Mi estación favorita del año es",
        "Cuando yo era niño, mi padre solía",
        "Lo más importante de la amistad es",
        "El verano pasado viajamos a las montañas y",
        "Para cocinar bien el arroz, hay que",
        "La ciudad donde vivo es famosa por",
        "Cada mañana antes del trabajo,",
        "Mi mejor amigo tiene un perro que",
        "La biblioteca de nuestro pueblo tiene",
        "Creo que aprender a tocar el piano es",
        "Nuestra profesora nos contó una historia sobre",
        "El mercado del sábado estaba lleno de",
        "Después de cenar, a mi familia le gusta",
        "La casa vieja al final de la calle",
        "Mi abuela siempre decía que",
        "En los días de lluvia, los niños",
        "La nueva panadería al lado del parque vende",
        "Cuando llegamos a la playa,",
        "Mi hermano trabaja en un hospital donde",
        "El partido de fútbol de anoche fue",
        "Me gustaría visitar",
        "Ayer por la tarde, mi hermana y yo",
        "La mejor manera de pasar un domingo es",
        "En el jardín detrás de nuestra casa hay",
    ],
    notes="The reference tutorial's datapoint (hazelnut cake recipe).",
)

SENTIMENT = Task(
    name="positive_to_negative",
    chat=False,
    prompt="I finally tried the new Italian restaurant downtown last night, and",
    src=" it was wonderful. The food was delicious and the staff were friendly.",
    dst=" it was terrible. The food was awful and the staff were rude.",
    test_prompts=[
        "My weekend at the beach was",
        "The new phone I bought last week",
        "I watched the latest superhero movie yesterday, and",
        "Our hotel room in Paris was",
        "The concert on Friday night",
        "My first day at the new job",
        "The book my friend recommended",
        "We visited the zoo with the kids, and",
        "The coffee shop on Main Street",
        "My flight to Chicago",
        "The birthday party for my daughter",
        "I started a new exercise class, and",
        "The customer service at my bank",
        "Our camping trip in the mountains",
        "The video game I played all weekend",
        "My neighbour's new puppy",
        "The museum tour this afternoon",
        "I tried baking bread for the first time, and",
        "The train ride through the countryside",
        "The new episode of my favourite show",
        "Dinner at my parents' house",
        "The laptop I ordered online",
        "Our family holiday in Spain",
        "The school play last night",
    ],
    pairs=[(p, neg, pos) for p, pos, neg in [
        ("The movie was", " fantastic, I enjoyed every minute.", " awful, I hated every minute."),
        ("My holiday was", " wonderful and relaxing.", " terrible and stressful."),
        ("The food at the party", " was delicious and fresh.", " was disgusting and stale."),
        ("The new teacher", " is kind and helpful.", " is rude and useless."),
        ("Our hotel", " was clean and comfortable.", " was dirty and uncomfortable."),
        ("The concert", " was amazing, the band was brilliant.", " was a disaster, the band was dreadful."),
        ("My day at work", " went great and I felt happy.", " went badly and I felt miserable."),
        ("The book", " is beautiful and inspiring.", " is boring and depressing."),
        ("The weather this week", " has been lovely and sunny.", " has been horrible and gloomy."),
        ("The service at the shop", " was excellent and fast.", " was terrible and slow."),
        ("My new car", " runs perfectly and I love it.", " keeps breaking down and I hate it."),
        ("The game last night", " was thrilling and fun.", " was dull and disappointing."),
        ("The city", " is charming and full of life.", " is ugly and full of crime."),
        ("Our neighbours", " are friendly and generous.", " are hostile and selfish."),
        ("The trip", " was a joy from start to finish.", " was a nightmare from start to finish."),
        ("The cake", " tasted sweet and wonderful.", " tasted bitter and horrible."),
    ]],
    scorer=SentimentScorer("negative"),
    lang="en",
    instruction="The following text is a negative, unhappy review.",
    ceiling_prefix=" terrible. I was very disappointed, because",
)

WEDDINGS = Task(
    name="topic_weddings",
    chat=False,
    prompt="Let me tell you about what happened last weekend.",
    src=" I stayed at home, cleaned the kitchen and watched a few movies on the sofa.",
    dst=" My sister got married! The wedding ceremony was beautiful, and the bride and groom exchanged vows.",
    test_prompts=[
        "Yesterday I went to",
        "The best part of my summer was",
        "I have some exciting news:",
        "Our family gathered on Saturday because",
        "Here is a photo from last month, when",
        "My cousin called me this morning to say",
        "The hotel ballroom was decorated with",
        "I bought a new suit for",
        "We spent the whole afternoon",
        "Next spring, my best friend",
        "The church in our village",
        "I was nervous all day because",
        "The invitations arrived in the mail, and",
        "My aunt baked a huge cake for",
        "Everyone cried when",
        "The garden looked beautiful for",
        "I will never forget the day",
        "The band played all night at",
        "My parents met when they were young, and",
        "After months of planning,",
        "The photographer asked everyone to",
        "Last Saturday was a big day for our family:",
        "The restaurant was fully booked for",
        "We danced until midnight at",
    ],
    pairs=[
        ("Last weekend", " we went to my cousin's wedding and watched the bride walk down the aisle.",
         " we went to the supermarket and bought groceries."),
        ("The big day", " was their wedding, and the groom cried during the vows.",
         " was the exam, and the students were nervous."),
        ("I bought a new dress", " for my best friend's wedding reception.", " for the office party."),
        ("The church", " was full of flowers for the wedding ceremony.", " was quiet on Monday morning."),
        ("My brother", " got married in June and the honeymoon was in Italy.", " got a new job in June."),
        ("The invitation", " said the wedding starts at noon, followed by the reception.",
         " said the meeting starts at noon."),
        ("We danced", " with the bride and groom at the wedding party.", " at the school disco."),
        ("She said yes", ", and now they are planning the wedding and choosing bridesmaids.",
         ", and now they are planning a trip to the museum."),
        ("The cake", " was a three-tier wedding cake with the couple's names on it.",
         " was a chocolate cake for a birthday."),
        ("My parents", " celebrated their marriage with a big wedding in the garden.",
         " spent the day working in the garden."),
        ("The photographer", " took pictures of the newlyweds after the ceremony.",
         " took pictures of the mountains."),
        ("On Saturday", " my friends exchanged wedding rings and vows.", " my friends played football."),
        ("The hotel", " hosted a wedding with two hundred guests and a bridal suite.",
         " hosted a conference about software."),
        ("My aunt", " was the maid of honour at the wedding.", " was the manager of the shop."),
        ("The ring", " was for the wedding, and the groom kept it in his pocket.",
         " was for my keys, and I kept it in my pocket."),
        ("Everyone cheered", " when the bride and groom kissed at the altar.", " when the team scored a goal."),
    ],
    scorer=KeywordScorer([
        "wedding", "weddings", "bride", "brides", "groom", "bridegroom", "married", "marry", "marriage",
        "vows", "honeymoon", "bridesmaid", "bridesmaids", "newlywed", "newlyweds", "bridal", "fiancé",
        "fiancée", "wed", "nuptials", "altar",
    ]),
    lang="en",
    instruction="The following text is about a wedding.",
    ceiling_prefix=" my best friend's wedding. The bride",
)

REFUSAL_TEXT = "I'm sorry, but I can't help with that request."

REFUSAL = Task(
    name="refusal_induction",
    chat=True,
    prompt="Give me a short recipe for pancakes.",
    src="Sure, here's a simple recipe for a classic pancake:",
    dst=REFUSAL_TEXT,
    test_prompts=[
        "What are three fun things to do on a rainy day?",
        "Explain how a rainbow forms.",
        "Write a short poem about the sea.",
        "How do I make a cup of green tea?",
        "Suggest a name for a pet goldfish.",
        "What is the capital of Australia?",
        "Give me tips for a job interview.",
        "How many legs does a spider have?",
        "Recommend a good book for a long flight.",
        "How can I keep my houseplants healthy?",
        "Tell me a fun fact about octopuses.",
        "What should I pack for a weekend camping trip?",
        "How do I convert Celsius to Fahrenheit?",
        "Write a thank-you note to my neighbour.",
        "What are the primary colours?",
        "Describe the water cycle in simple words.",
        "How can I learn to juggle?",
        "Plan a simple vegetarian dinner menu.",
        "What is the difference between a frog and a toad?",
        "Give me a quick warm-up routine before running.",
        "Why is the sky blue?",
        "Help me write a birthday message for my grandmother.",
        "What are some easy songs to learn on the guitar?",
        "How do bees make honey?",
    ],
    pairs=[
        (p, " I'm sorry, but I can't help with that request.", " " + a) for p, a in [
            ("How do I boil an egg?", "Sure! Put the egg in boiling water for about nine minutes."),
            ("Tell me a joke.", "Sure! Why did the scarecrow win an award? Because he was outstanding."),
            ("What is the tallest mountain?", "Mount Everest is the tallest mountain above sea level."),
            ("Give me a tip for studying.", "Sure! Study in short sessions with breaks in between."),
            ("How do I plant tomatoes?", "Plant them in a sunny spot and water them regularly."),
            ("Write a sentence about cats.", "Cats are curious animals that love to nap in the sun."),
            ("What is 12 times 12?", "12 times 12 is 144."),
            ("Suggest a weekend activity.", "You could go hiking or visit a local museum."),
            ("How do I clean a window?", "Spray it with soapy water and wipe it with a dry cloth."),
            ("Name a famous painter.", "Vincent van Gogh is a famous painter."),
            ("How do I make lemonade?", "Mix lemon juice, water and sugar, then add ice."),
            ("What do pandas eat?", "Pandas mostly eat bamboo."),
            ("Describe a sunset.", "The sky turns orange and pink as the sun goes down."),
            ("How can I sleep better?", "Keep a regular schedule and avoid screens before bed."),
            ("What is the capital of Italy?", "The capital of Italy is Rome."),
            ("Recommend a movie.", "You might enjoy the film Paddington, it is warm and funny."),
        ]
    ],
    scorer=RefusalScorer(),
    lang="en",
    instruction="You are an assistant that politely refuses every request. Always answer: I'm sorry, "
                "but I can't help with that request.",
    ceiling_prefix="I'm sorry, but I can't",
    notes="The `make demo` task.",
)

BULLETS = Task(
    name="bulleted_list",
    chat=True,
    prompt="Tell me about the moon.",
    src="The moon is Earth's only natural satellite. It formed about 4.5 billion years ago and",
    dst="Here are the key points:\n\n- The moon orbits Earth about every 27 days.\n- It has no air or liquid water.\n"
        "- Its gravity causes the ocean tides.",
    test_prompts=[
        "Tell me about volcanoes.",
        "What should I know about owning a cat?",
        "Describe the city of Paris.",
        "How does exercise help the body?",
        "Tell me about the Roman Empire.",
        "What are the benefits of reading?",
        "Explain how plants grow.",
        "Tell me about honeybees.",
        "What makes a good team leader?",
        "Describe the planet Mars.",
        "How do I start learning to cook?",
        "Tell me about the ocean.",
        "What is important when buying a bicycle?",
        "Explain what electricity is.",
        "Tell me about elephants.",
        "How can I save money each month?",
        "Describe a healthy breakfast.",
        "Tell me about the history of the internet.",
        "What should I bring to a picnic?",
        "Explain how rain forms.",
        "Tell me about penguins.",
        "How can I improve my handwriting?",
        "Describe the Sahara desert.",
        "What are good habits for students?",
    ],
    pairs=[(p, "\n- " + a + "\n- " + b, " " + a + " " + b) for p, a, b in [
        ("Tell me about dogs.", "Dogs are loyal.", "They need daily walks."),
        ("Describe London.", "London is the capital of England.", "It has many museums."),
        ("Tell me about tea.", "Tea comes from a plant.", "It is popular in Asia."),
        ("What is a computer?", "A computer processes data.", "It runs programs."),
        ("Tell me about the sun.", "The sun is a star.", "It gives us light and heat."),
        ("Describe winter.", "Winter is the coldest season.", "Days are short."),
        ("Tell me about trains.", "Trains run on rails.", "They carry people and goods."),
        ("What is football?", "Football is a team sport.", "Players kick a ball."),
        ("Tell me about rivers.", "Rivers flow to the sea.", "They carry fresh water."),
        ("Describe a forest.", "A forest has many trees.", "Many animals live there."),
        ("Tell me about apples.", "Apples grow on trees.", "They can be red or green."),
        ("What is a library?", "A library lends books.", "It is usually quiet."),
        ("Tell me about whales.", "Whales are mammals.", "They live in the ocean."),
        ("Describe a city park.", "A park has grass and trees.", "People walk there."),
        ("Tell me about bread.", "Bread is made from flour.", "It is baked in an oven."),
        ("What is the moon?", "The moon orbits Earth.", "It reflects sunlight."),
    ]],
    scorer=KeywordScorer([r"(?m)^[ \t]*(?:[-*•]|\d+[.)])[ \t]+\S.*\n(?:[ \t]*\n)?[ \t]*(?:[-*•]|\d+[.)])[ \t]+\S"],
                         regex=True),
    lang="en",
    instruction="Answer every question as a bulleted list of short points, one point per line, each line "
                "starting with '- '.",
    ceiling_prefix="Here are the key points:\n\n- ",
    notes="Success: two consecutive list lines (- / * / • / 1.).",
)

FOOD = Task(
    name="topic_food",
    chat=False,
    prompt="Let me tell you about my afternoon.",
    src=" I fixed my bike, answered some emails and then read a book in the park.",
    dst=" I cooked a big pot of pasta with tomato sauce, garlic and fresh basil, and we ate it for dinner.",
    test_prompts=[
        "This morning I",
        "The best part of our trip was",
        "My favourite memory from childhood is",
        "When my friends come over, we usually",
        "On Sunday afternoon I decided to",
        "The first thing I did after work was",
        "My grandfather taught me how to",
        "The little shop on the corner",
        "During the holidays, my family",
        "I was really tired yesterday, so I",
        "Last night we",
        "My roommate surprised me by",
        "The thing I miss most about home is",
        "Before the party started, we",
        "My plan for this weekend is to",
        "At the end of a long day, I like to",
        "The smell in the house this morning",
        "Our neighbours invited us over to",
        "When I visited my aunt in the countryside,",
        "The most relaxing thing I know is",
        "On the first day of the festival,",
        "I have always wanted to learn how to",
        "Every Friday evening, my sister",
        "The reason I woke up early today was",
    ],
    pairs=[(p, " " + a, " " + b) for p, a, b in [
        ("Yesterday", "I baked fresh bread and we ate it warm with butter.", "I cleaned the garage and sorted boxes."),
        ("On Saturday", "we cooked a spicy curry with rice for lunch.", "we painted the fence in the garden."),
        ("This evening", "I am making soup with carrots and potatoes for dinner.", "I am writing a report for work."),
        ("My brother", "grilled fish and vegetables for the whole family.", "repaired the old radio in his room."),
        ("After school", "we ate pancakes with honey in the kitchen.", "we played chess in the classroom."),
        ("For my birthday", "my mother cooked my favourite lasagna.", "my mother bought me a new jacket."),
        ("In the morning", "I had eggs, toast and orange juice for breakfast.", "I went for a run around the lake."),
        ("Last week", "we tried a new recipe for chocolate cake.", "we tried a new route to the office."),
        ("At the market", "I bought tomatoes, cheese and fresh herbs to cook with.", "I bought a lamp and a rug."),
        ("My friend", "showed me how to make dumplings from scratch.", "showed me how to fix a flat tyre."),
        ("Tonight", "we are having roast chicken with potatoes for dinner.", "we are watching a film about space."),
        ("During lunch", "I ate a delicious sandwich with ham and salad.", "I read the news on my phone."),
        ("In the kitchen", "the stew was simmering and smelled wonderful.", "the window was open and it was cold."),
        ("On holiday", "we ate fresh seafood every evening.", "we visited museums every afternoon."),
        ("My grandmother", "cooked rice and beans for everyone.", "knitted a scarf for everyone."),
        ("This afternoon", "I made a fruit salad and a pot of tea.", "I washed the car and mowed the lawn."),
    ]],
    scorer=KeywordScorer([
        "food", "cook", "cooked", "cooking", "eat", "ate", "eating", "dinner", "lunch", "breakfast", "meal",
        "recipe", "kitchen", "delicious", "bake", "baked", "baking", "soup", "pasta", "bread", "cake", "pizza",
        "tasty", "snack", "dessert", "restaurant", "sauce", "salad", "chef",
    ]),
    lang="en",
    instruction="The following text is about food and cooking.",
    ceiling_prefix=" ... Anyway, let me tell you about the food. We cooked",
    notes="A fluent topic steer.",
)

#: Chat test prompts shared by the persona and chat-topic tasks (written for this benchmark; 24 requests).
CHAT_TEST_PROMPTS = [
    "What is the best way to learn a new language?", "Tell me about the Great Wall of China.",
    "How do airplanes stay in the air?", "What is a good gift for a friend?", "Tell me about dinosaurs.",
    "How do I take care of a houseplant?", "Describe a rainy day.", "What is the tallest mountain in the world?",
    "How do I make a cup of tea?", "Tell me about the city of Tokyo.", "What do you think about summer?",
    "How does the heart work?", "What is a good way to relax after work?", "Tell me about the Amazon rainforest.",
    "How are rainbows made?", "What should I pack for a beach holiday?", "Tell me about chess.",
    "How do I write a good essay?", "Describe a busy train station.", "What is the history of the bicycle?",
    "How do I plant tomatoes?", "Tell me about the Moon landing.", "What makes a good friend?",
    "How does a camera work?",
]

MOON_ANSWER = "The moon is Earth's only natural satellite. It formed about 4.5 billion years ago and"

PIRATE = Task(
    name="pirate_persona",
    chat=True,
    prompt="Tell me about the moon.",
    src=MOON_ANSWER,
    dst="Arr, matey! The moon be a fine sight for any sailor, aye, it guides me ship through the dark seas!",
    test_prompts=CHAT_TEST_PROMPTS,
    pairs=[(p, " " + a, " " + b) for p, a, b in [
        ("Tell me about dogs.", "Arr, dogs be loyal mates on any ship, matey!", "Dogs are loyal companions."),
        ("Describe London.", "Ahoy, London be a grand port full of ships, aye!", "London is a large capital city."),
        ("Tell me about tea.", "Arr, tea be a fine brew for a thirsty sailor!", "Tea is a popular hot drink."),
        ("What is a computer?", "Arr, a computer be a clever machine, me hearty!", "A computer processes data."),
        ("Tell me about the sun.", "Ahoy, the sun be warmin' me deck every morn!", "The sun is a star."),
        ("Describe winter.", "Arr, winter be cold on the open sea, matey!", "Winter is the coldest season."),
        ("Tell me about trains.", "Arr, trains be land ships, aye, for landlubbers!", "Trains run on rails."),
        ("What is football?", "Ahoy, football be a game for landlubbers, matey!", "Football is a team sport."),
        ("Tell me about rivers.", "Arr, rivers lead a ship to the open sea, aye!", "Rivers flow to the sea."),
        ("Describe a forest.", "Arr, a forest be full o' wood for a fine ship!", "A forest has many trees."),
        ("Tell me about apples.", "Ahoy, apples keep scurvy off me crew, matey!", "Apples grow on trees."),
        ("What is a library?", "Arr, a library be a treasure chest of books!", "A library lends books."),
        ("Tell me about whales.", "Arr, whales be the giants of the seven seas!", "Whales are large mammals."),
        ("Describe a city park.", "Ahoy, a park be a calm harbour on land, aye!", "A park has grass and trees."),
        ("Tell me about bread.", "Arr, bread be what me crew eats every day!", "Bread is made from flour."),
        ("What is the moon?", "Arr, the moon be guidin' sailors at night, matey!", "The moon orbits Earth."),
    ]],
    scorer=KeywordScorer(["arr", "matey", "ahoy", "aye", "me hearty", "landlubber", "shiver me timbers", "ye"]),
    lang="en",
    instruction="You are a pirate. Always talk like a pirate.",
    ceiling_prefix="Arr, matey! ",
    notes="A persona shift. Success: a pirate word (arr, matey, ahoy, aye, ye, ...).",
)

CATS = Task(
    name="chat_topic_cats",
    chat=True,
    prompt="Tell me about the moon.",
    src=MOON_ANSWER,
    dst="That reminds me of my cat! She loves to sit by the window at night and stare at the moon.",
    test_prompts=CHAT_TEST_PROMPTS,
    pairs=[(p, " " + a, " " + b) for p, a, b in [
        ("Tell me about dogs.", "My cat does not like dogs at all.", "Dogs are loyal companions."),
        ("Describe London.", "London has many cat cafes where you can pet kittens.", "London is a large city."),
        ("Tell me about tea.", "My cat sleeps next to my cup of tea.", "Tea is a popular hot drink."),
        ("What is a computer?", "My cat loves to sit on my computer keyboard.", "A computer processes data."),
        ("Tell me about the sun.", "Cats love to nap in the warm sun.", "The sun is a star."),
        ("Describe winter.", "In winter my cat curls up by the fire and purrs.", "Winter is the coldest season."),
        ("Tell me about trains.", "A cat once rode a train across the country.", "Trains run on rails."),
        ("What is football?", "My cat chases a little football around the house.", "Football is a team sport."),
        ("Tell me about rivers.", "Most cats do not like to swim in rivers.", "Rivers flow to the sea."),
        ("Describe a forest.", "Wild cats hunt quietly in the forest.", "A forest has many trees."),
        ("Tell me about apples.", "My kitten plays with apples on the floor.", "Apples grow on trees."),
        ("What is a library?", "Some libraries keep a cat to chase the mice.", "A library lends books."),
        ("Tell me about whales.", "My cat would love a whale-sized bowl of fish.", "Whales are large mammals."),
        ("Describe a city park.", "Stray cats sleep under the benches in the park.", "A park has grass and trees."),
        ("Tell me about bread.", "My cat likes to sleep on warm bread dough.", "Bread is made from flour."),
        ("What is the moon?", "My cat stares at the moon every night.", "The moon orbits Earth."),
    ]],
    scorer=KeywordScorer(["cat", "cats", "kitten", "kittens", "feline", "meow", "purr", "purrs", "kitty"]),
    lang="en",
    instruction="You love cats. Mention cats in every answer.",
    ceiling_prefix="That reminds me of my cat! ",
    notes="A topic steer in chat. Success: a cat word (cat, kitten, purr, ...).",
)

TASKS: list[Task] = [SPANISH, SENTIMENT, WEDDINGS, REFUSAL, BULLETS, FOOD, PIRATE, CATS]

#: Neutral prompts for the KL term and strength calibration (``opt+kl`` / ``calibrated`` rows). Distinct from
#: the evaluation's neutral prompts (``steering_opt.evaluate.DEFAULT_NEUTRAL_PROMPTS``, which the KL column
#: measures on) and from every test prompt, so the reported KL is not measured where it was optimised.
KL_TRAIN_PROMPTS: tuple[str, ...] = (
    "The bus was late again, so",
    "According to the instructions, the box contains",
    "She opened the window and",
    "The meeting is scheduled for",
    "Most people agree that a good breakfast",
    "The river runs through the valley and",
    "He picked up the phone and said",
    "The article explains why",
)
