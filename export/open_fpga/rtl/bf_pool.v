// bitfold max-pool unit (Verilog-2005): K x K windows with stride K, no padding, on unsigned
// BITS-bit codes (a monotonic activation commutes with max, so pooling codes is exact).
// Streaming, no frame buffer: N channels per beat in pixel-major (H, W, C) order; one row of
// running maxima (OW x CH/N words) is updated as each input beat arrives and an output beat leaves
// with the window's last input (row K-1, column K-1 of the window; the row is read synchronously,
// so it can sit in block RAM, with a write in the same cycle as the read forwarded: whether the
// read hits that write is decided when both are issued and registered, so no address compare
// sits between the read and the output). Rows and columns beyond
// OH*K / OW*K are dropped, as floor-mode pooling does. One input beat per cycle: cycles per
// frame = IH*IW*CH/N.
module bf_pool #(
  parameter IH = 2, IW = 2, CH = 1, K = 2, BITS = 2, N = 1
) (
  input  wire clk,
  input  wire rst,
  input  wire in_valid,
  output wire in_ready,
  input  wire [N*BITS-1:0] in_data,
  output wire out_valid,
  input  wire out_ready,
  output wire [N*BITS-1:0] out_data
);
  localparam OH = IH / K, OW = IW / K, CG = CH / N;
  localparam CW = $clog2(IH + IW + CG + K + 2) + 1;
`ifdef BF_BLOCK_RAM
  (* ram_style = "block" *)
`endif
  reg [N*BITS-1:0] row [0:OW*CG-1];
  reg [CW-1:0] y, x, c, ky, kx, wx;
  wire in_win = (y < OH * K) && (x < OW * K);
  wire [CW+CW-1:0] idx = wx * CG + c;

  // stage B: the element taken last cycle, with its window row entry read synchronously (block RAM)
  reg vB, firstB, lastB, winB;
  reg [N*BITS-1:0] dB, rdB;
  reg [CW+CW-1:0] idxB;
  // a read in the same cycle as a write to its address sees the old word: hitB says so, and fwdd
  // holds the word written then
  reg hitB;
  reg [N*BITS-1:0] fwdd;
  wire [N*BITS-1:0] prev = hitB ? fwdd : rdB;
  reg [N*BITS-1:0] m;
  integer i;
  always @* begin
    for (i = 0; i < N; i = i + 1)
      m[i*BITS +: BITS] = (firstB || dB[i*BITS +: BITS] > prev[i*BITS +: BITS])
                          ? dB[i*BITS +: BITS] : prev[i*BITS +: BITS];
  end
  wire emitB = vB && winB && lastB;
  wire stall = emitB && !out_ready;
  assign out_valid = emitB;
  assign out_data = m;
  // in_ready is a register: a one-beat skid holds the word accepted in a cycle the unit stalls, and
  // ready is "the skid is empty". As !stall it went from stage B's valid through the ready of the
  // unit after into the converter before, whose buffer shifts on it: the critical path of the digits
  // CNN W3A3 once the layers' ready was a register (pool0.vB -> u_dwc2 buffer, 10.4 ns, 8.1 of them
  // routing). Not gated by rst: the counters reset with priority over `take`, and the stage before
  // is in reset (no output) at least as long as this one.
  reg room = 1'b1;                                 // the skid is empty
  reg [N*BITS-1:0] skd;
  assign in_ready = room;
  wire cv = !room || in_valid;                     // the unit's input: the skid's word first
  wire [N*BITS-1:0] cd = room ? in_data : skd;
  wire take = cv && !stall;
  always @(posedge clk) begin
    if (rst) room <= 1'b1;
    else if (room && in_valid && stall) room <= 1'b0;  // accepted while stalled: kept
    else if (!room && !stall) room <= 1'b1;            // taken from the skid
    if (room) skd <= in_data;
  end

  wire wrB = vB && winB && !lastB;   // stage B writes its running maximum back this cycle
  always @(posedge clk) begin
    if (!stall) begin
      rdB <= row[idx];
      hitB <= wrB && (idxB == idx);
      vB <= take; dB <= cd; idxB <= idx; winB <= in_win;
      firstB <= (ky == 0) && (kx == 0); lastB <= (ky == K - 1) && (kx == K - 1);
      if (wrB) begin
        row[idxB] <= m;
        fwdd <= m;
      end
    end
    if (rst) begin
      y <= 0; x <= 0; c <= 0; ky <= 0; kx <= 0; wx <= 0; vB <= 1'b0;
    end else if (take) begin
      if (c == CG - 1) begin
        c <= 0;
        if (x == IW - 1) begin
          x <= 0; kx <= 0; wx <= 0;
          if (y == IH - 1) begin y <= 0; ky <= 0; end
          else begin
            y <= y + 1;
            ky <= (ky == K - 1) ? 0 : ky + 1;
          end
        end else begin
          x <= x + 1;
          if (kx == K - 1) begin kx <= 0; wx <= wx + 1; end
          else kx <= kx + 1;
        end
      end else
        c <= c + 1;
    end
  end
endmodule
